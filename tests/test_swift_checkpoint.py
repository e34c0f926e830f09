"""Checkpoints Megatron-SWIFT wrote load as `--load`; `--model X --load Y` trains Y's weights with X's
config; `--no_load_optim` / `--no_load_rng` resume without those states; megaswift's args.json
carries the keys Megatron-SWIFT reads.

What ms-swift 3.8 writes (v3.8.3, swift/megatron/utils/convert.py `convert_hf2mcore`): `args.save_args()`
(swift/llm/argument/base_args/base_args.py: `json.dump(check_json_format(self.__dict__))` of its
ExportArguments: `model` as given, `model_dir` the local snapshot, `model_type` ms-swift's, `torch_dtype`
"bfloat16", `train_type` "lora" (BaseArguments' default), `to_mcore` true, no `padded_vocab_size`),
then Megatron-LM's `save_checkpoint(1, ...)`: `iter_0000001/` + tracker "1", and a common.pt holding
`args` (Megatron-LM's argparse.Namespace, on which initialize_megatron(args_defaults=...) set ms-swift's
`model_info`, `model_meta`, `megatron_model_meta` objects), `checkpoint_version` 3.0, `iteration` 1,
`rerun_state_machine` {"mode": RerunMode}, `num_floating_point_operations_so_far`. No config.json or
tokenizer is copied into the directory. `MegatronTrainArguments._init_ckpt_dir` reads `model` back from
a `--load` directory's args.json when `--model` is not given.

The Megatron-SWIFT directory here is megaswift's export rewritten into that form: the same
torch_dist shards (megaswift writes megatron-core's GPTModel names, as Megatron-SWIFT does), with
ms-swift's args.json, Megatron-LM's common.pt (its ms-swift objects under modules that do not exist
here, so loading proves nothing was imported) and no hf_config/. The tiny llama's vocab (49152) is
padded to a multiple of 5 (49155 rows), so a reader that recomputes the padding fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import assert_bitwise_equal, logged, ok, read_safetensors_dir, run_cli, run_megatron

TRACKER = "latest_checkpointed_iteration.txt"
RTOL = 1e-6


def _sft(load, dataset, save, iters, *extra):
    return ["sft", "--load", str(load), "--dataset", dataset, "--save", str(save), "--train_iters", str(iters),
            "--global_batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-4", "--max_length", "256",
            "--add_version", "false", *extra]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


# -- a Megatron-SWIFT checkpoint directory ----------------------------------------------------

@dataclasses.dataclass
class ModelInfo:  # swift/llm/model/utils.py
    model_type: str
    model_dir: str
    torch_dtype: torch.dtype
    max_model_len: int
    quant_method: object = None
    quant_bits: object = None
    config: object = None


@dataclasses.dataclass
class MegatronModelMeta:  # swift/megatron/model/register.py
    megatron_model_type: str
    model_types: list
    model_provider: object
    convert_hf_config: object


def model_provider(*_a, **_k):  # swift/megatron/model/model_provider.py
    raise AssertionError("a checkpoint's function was called")


def convert_gpt_hf_config(*_a, **_k):  # swift/megatron/model/gpt/config.py
    raise AssertionError("a checkpoint's function was called")


@contextlib.contextmanager
def _as_ms_swift_objects():
    """Pickle the stand-ins above under ms-swift's module paths (modules that exist only here)."""
    where = {ModelInfo: "swift.llm.model.utils", MegatronModelMeta: "swift.megatron.model.register",
             model_provider: "swift.megatron.model.model_provider",
             convert_gpt_hf_config: "swift.megatron.model.gpt.config"}
    saved = {obj: obj.__module__ for obj in where}
    added = []
    for obj, module in where.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        obj.__module__ = module
        setattr(sys.modules[module], obj.__name__, obj)
    try:
        yield
    finally:
        for obj, module in saved.items():
            obj.__module__ = module
        for name in added:
            sys.modules.pop(name, None)


def megatron_lm_common(hf_dir: Path, padded_vocab_size: int, iteration: int = 1) -> dict:
    """Megatron-LM core_r0.13.0 `generate_state_dict` + `save_checkpoint`'s common part of a
    Megatron-SWIFT export (no optimizer, no RNG: convert_kwargs' no_save_optim / no_save_rng)."""
    from megatron.core.rerun_state_machine import RerunMode
    from megatron.core.transformer.enums import AttnBackend
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(hf_dir)
    args = argparse.Namespace(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, padded_vocab_size=padded_vocab_size,
        params_dtype=torch.float32, attention_backend=AttnBackend.unfused, tensor_model_parallel_size=1,
        finetune=True, no_save_optim=True, load=None, save="/abs/Qwen2.5-7B-Instruct-mcore", ckpt_format="torch_dist",
        recompute_modules=["core_attn"], rope_scaling=None, consumed_train_samples=0,
        model_info=ModelInfo("llama", str(hf_dir), torch.float32, 8192, config=config),
        megatron_model_meta=MegatronModelMeta("gpt", ["llama"], model_provider, convert_gpt_hf_config))
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
            "rerun_state_machine": {"mode": RerunMode.DISABLED}, "num_floating_point_operations_so_far": 0}


def ms_swift_export_args(hf_dir: Path, save: Path) -> dict:
    """The args.json of `swift export --model <hf> --to_mcore true` (ExportArguments.__dict__, abridged)."""
    return {"model": str(hf_dir), "model_type": "llama", "model_revision": None, "task_type": "causal_lm",
            "torch_dtype": "float32", "attn_impl": None, "new_special_tokens": [], "num_labels": None,
            "rope_scaling": None, "max_model_len": None, "template": "llama", "system": None, "max_length": 2048,
            "train_type": "lora", "adapters": [], "external_plugins": [], "seed": 42, "load_args": True,
            "use_hf": False, "hub_token": None, "output_dir": str(save), "to_mcore": True, "to_hf": False,
            "mcore_model": None, "mcore_adapters": [], "thread_count": None, "test_convert_precision": False,
            "model_dir": str(hf_dir), "model_suffix": hf_dir.name,
            "model_info": f"ModelInfo(model_type='llama', model_dir='{hf_dir}', torch_dtype=torch.float32, ...)",
            "rank": -1, "local_rank": -1, "global_world_size": 1, "local_world_size": 1}


def as_megatron_swift(export: Path, out: Path, args_json: dict | None, hf_dir: Path) -> Path:
    """megaswift's `--to_mcore` export `export` rewritten into the directory Megatron-SWIFT writes."""
    out.mkdir(parents=True)
    ckpt = out / "iter_0000001"
    shutil.copytree(export / "release", ckpt)
    rows = json.loads((export / "args.json").read_text())["padded_vocab_size"]
    with _as_ms_swift_objects():
        torch.save(megatron_lm_common(hf_dir, rows), ckpt / "common.pt")
    (out / TRACKER).write_text("1")
    if args_json is not None:
        (out / "args.json").write_text(json.dumps(args_json, indent=2))
    return out


@pytest.fixture(scope="module")
def hf(model_dir):
    return model_dir


@pytest.fixture(scope="module")
def export(hf, tmp_path_factory):
    """megaswift's export of the HF model, vocab rows padded to a multiple of 5 (49155)."""
    out = tmp_path_factory.mktemp("export") / "mc"
    ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(out),
                     "--make_vocab_size_divisible_by", "5"]))
    assert json.loads((out / "args.json").read_text())["padded_vocab_size"] == 49155
    return out


@pytest.fixture(scope="module")
def swift_dir(export, hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("swift") / "Llama-mcore"
    return as_megatron_swift(export, out, ms_swift_export_args(hf, out), hf)


@pytest.fixture(scope="module")
def trained(export, dataset, tmp_path_factory):
    """4 iterations from the export with a checkpoint at 2 and 4; the tracker is put back at 2."""
    save = tmp_path_factory.mktemp("trained") / "run"
    ok(run_megatron(_sft(export, dataset, save, 4, "--save_interval", "2")))
    (save / TRACKER).write_text("2")
    return save


# -- common.pt: Megatron-LM's args load as inert stand-ins, anything else is refused -----------

def test_megatron_lm_common_loads_without_importing(hf, tmp_path):
    from megaswift.converters.hf_io import CheckpointError
    from megaswift.runtime.safe_load import Unresolved, load_common_file

    with _as_ms_swift_objects():
        torch.save(megatron_lm_common(hf, 49155), tmp_path / "common.pt")
        torch.save({"iteration": 1, "x": ModelInfo("llama", "/m", torch.float32, 1)}, tmp_path / "outside.pt")
        torch.save({"args": argparse.Namespace(run=exec)}, tmp_path / "exec.pt")
    state = load_common_file(tmp_path / "common.pt")
    args = state["args"]
    assert isinstance(args, argparse.Namespace) and args.padded_vocab_size == 49155
    assert args.params_dtype is torch.float32 and args.recompute_modules == ["core_attn"]
    assert isinstance(args.model_info, Unresolved) and args.model_info.name == "swift.llm.model.utils.ModelInfo"
    assert args.model_info.state["model_dir"] == str(hf)  # what it was pickled with, kept as data
    assert issubclass(args.megatron_model_meta.state["model_provider"], Unresolved)  # a function: never called
    assert state["iteration"] == 1 and isinstance(state["rerun_state_machine"]["mode"], Unresolved)
    with pytest.raises(CheckpointError, match=r"outside\.pt holds a disallowed object swift\.llm\.model\.utils\."):
        load_common_file(tmp_path / "outside.pt")
    with pytest.raises(CheckpointError, match=r"exec\.pt holds a disallowed object builtins\.exec"):
        load_common_file(tmp_path / "exec.pt")


# -- Megatron-SWIFT's directory as --load ------------------------------------------------------

def test_sft_from_megatron_swift_export_equals_megaswift_export(swift_dir, hf, trained, dataset, tmp_path):
    assert not (swift_dir / "hf_config").exists() and (swift_dir / "iter_0000001" / "common.pt").is_file()
    save = tmp_path / "run"
    out = ok(run_megatron(_sft(swift_dir, dataset, save, 2)))
    assert "loaded weights from" in out.stderr and "(iteration 0)" in out.stderr
    got, want = logged(save), logged(trained)
    assert sorted(got) == [1, 2]
    assert _close(got[1], want[1]), f"first loss {got[1]} from Megatron-SWIFT's directory, {want[1]} from megaswift's"
    # the run records the HF model it descends from, in the keys Megatron-SWIFT reads back
    record = json.loads((save / "args.json").read_text())
    assert record["model"] == record["model_dir"] == str(hf) and record["model_type"] == "llama"
    assert record["padded_vocab_size"] == 49155 and record["train_type"] == "full"


def test_megatron_swift_training_directory_trains_from_its_weights(swift_dir, hf, trained, dataset, tmp_path):
    """A Megatron-SWIFT run's --save: iter_0000100 with Megatron-LM's optimizer and schedule in its
    common state, and MegatronTrainArguments' args.json (its padded_vocab_size set): its weights
    load at iteration 0, and the run's own state is said to be left unread."""
    run = tmp_path / "v0-20250101-000000"
    run.mkdir()
    ckpt = run / "iter_0000100"
    shutil.copytree(swift_dir / "iter_0000001", ckpt)
    with _as_ms_swift_objects():
        common = megatron_lm_common(hf, 49155, iteration=100)
        common["optimizer"] = {"param_groups": [{"lr": 1e-5, "weight_decay": 0.1, "params": [0, 1]}],
                               "param_state_sharding_type": "dp_zero_gather_scatter"}
        common["opt_param_scheduler"] = {"max_lr": 1e-5, "min_lr": 0.0, "num_steps": 1600, "lr_warmup_steps": 0}
        torch.save(common, ckpt / "common.pt")
    (run / TRACKER).write_text("100")
    args = {**ms_swift_export_args(hf, run), "train_type": "full", "padded_vocab_size": 49155, "load": str(swift_dir),
            "save": str(run), "tensor_model_parallel_size": 1, "finetune": False, "no_load_optim": False}
    del args["to_mcore"]
    (run / "args.json").write_text(json.dumps(args))
    save = tmp_path / "run"
    out = ok(run_megatron(_sft(run, dataset, save, 1)))
    assert "was saved by Megatron-LM (Megatron-SWIFT) at iteration 100" in out.stderr
    assert f"config.json and tokenizer from {hf}" in out.stderr
    assert _close(logged(save)[1], logged(trained)[1]), (logged(save)[1], logged(trained)[1])
    # an args.json that records other vocab rows than the shards hold is named before any work
    (run / "args.json").write_text(json.dumps({**args, "padded_vocab_size": 49152}))
    proc = run_cli(_sft(run, dataset, tmp_path / "again", 1))
    assert proc.returncode != 0 and "padded_vocab_size 49152" in proc.stderr and "49155 embedding rows" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_export_of_megatron_swift_directory_round_trips_bitwise(swift_dir, hf, tmp_path):
    ok(run_megatron(["export", "--load", str(swift_dir), "--to_hf", "true", "--save", str(tmp_path / "hf")]))
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


def test_megatron_swift_directory_without_config_names_model(swift_dir, hf, dataset, tmp_path):
    lost = tmp_path / "lost"
    shutil.copytree(swift_dir, lost)
    args = json.loads((lost / "args.json").read_text())
    args.update(model="Qwen/Qwen2.5-7B-Instruct", model_dir="/nonexistent/Qwen2.5-7B-Instruct")
    (lost / "args.json").write_text(json.dumps(args))
    bare = tmp_path / "bare"  # Megatron-LM's own: no args.json at all
    shutil.copytree(swift_dir, bare)
    (bare / "args.json").unlink()
    for ckpt, named in ((lost, "model_dir '/nonexistent/Qwen2.5-7B-Instruct'"), (bare, "args.json is missing")):
        proc = run_cli(_sft(ckpt, dataset, tmp_path / "run", 1))
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert proc.returncode != 0 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "--model <hf dir>" in errors[0] and named in errors[0], errors[0]
        assert not (tmp_path / "run").exists()
    # with --model naming the HF folder, such a directory exports (its weights, --model's config and tokenizer)
    ok(run_megatron(["export", "--load", str(lost), "--model", str(hf), "--to_hf", "true", "--save", str(tmp_path / "hf")]))
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


# -- --model X --load Y: config from X, weights (and a run's state) from Y ---------------------

def test_model_and_load_take_the_weights_of_load(hf, trained, dataset, tmp_path):
    both = tmp_path / "both"
    out = ok(run_megatron(_sft(trained, dataset, both, 1, "--model", str(hf), "--finetune", "true")))
    assert f"config and tokenizer from --model {hf}" in out.stderr
    alone = tmp_path / "alone"
    ok(run_megatron(_sft(trained, dataset, alone, 1, "--finetune", "true")))
    first, from_load, from_model = logged(both)[1], logged(alone)[1], logged(trained)[1]
    assert _close(first, from_load), f"--model --load {first} vs --load {from_load}"
    assert abs(first - from_model) > 1e-3, f"--model --load {first} is --model's own {from_model}"


def test_model_and_load_resume_the_run(hf, trained, dataset, tmp_path):
    save = tmp_path / "resumed"
    out = ok(run_megatron(_sft(trained, dataset, save, 4, "--model", str(hf))))
    assert f"resumed from {trained} at iteration 2" in out.stderr
    got, want = logged(save), logged(trained)
    assert sorted(got) == [3, 4]
    for it in got:
        assert _close(got[it], want[it]), f"iteration {it}: {got[it]} vs uninterrupted {want[it]}"


def test_no_load_optim_resumes_iteration_with_fresh_optimizer(trained, dataset, tmp_path):
    save = tmp_path / "fresh"
    out = ok(run_megatron(_sft(trained, dataset, save, 4, "--no_load_optim", "true", "--no_load_rng", "true")))
    assert f"resumed from {trained} at iteration 2" in out.stderr
    assert "fresh optimizer state (--no_load_optim) and RNG state (--no_load_rng)" in out.stderr
    got, want = logged(save), logged(trained)
    assert sorted(got) == [3, 4]
    assert _close(got[3], want[3]), (got[3], want[3])  # the same weights and batch at the first step
    assert abs(got[4] - want[4]) > 1e-6, (got[4], want[4])  # a fresh Adam moves them differently
    assert logged(save, "lr")[3] == logged(trained, "lr")[3]  # the schedule resumed


# -- megaswift's args.json as Megatron-SWIFT reads it ------------------------------------------

def test_args_json_has_megatron_swift_keys(export, trained, hf):
    from megaswift.checkpointing import CheckpointRecord

    for root in (export, trained):  # an export, and a run from it (the HF model is inherited)
        data = json.loads((root / "args.json").read_text())
        # MegatronTrainArguments._init_ckpt_dir: `self.model = old_args.get('model')`
        assert data["model"] == str(hf) and data["model_dir"] == str(hf.resolve()), data
        assert data["torch_dtype"] == "float32" and data["train_type"] == "full"
        assert "model_type" not in data  # unknown: ms-swift infers its own from the model
        record = CheckpointRecord.read(root)
        assert record.model == str(hf) and "train_type" not in record.flags


def test_lora_record_carries_megatron_swift_tuner_keys(tmp_path):
    from megaswift.checkpointing import CheckpointRecord

    tuner = {"train_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_bias": "none",
             "use_rslora": False, "target_modules": ["all-linear"], "target_regex": None, "modules_to_save": []}
    CheckpointRecord("llama", "bfloat16", 49152, 128, model="/m", model_dir="/m", model_type="llama3",
                     flags={"tuner": tuner, "model_args": {"load": "/base-mcore"}}).write(tmp_path)
    data = json.loads((tmp_path / "args.json").read_text())
    # MegatronTunerMixin.load_tuner_config: the tuner keys and `load` (the base), top level
    assert {k: data[k] for k in tuner} == tuner and data["load"] == "/base-mcore" and data["model_type"] == "llama3"
    assert CheckpointRecord.read(tmp_path).flags == {"tuner": tuner, "model_args": {"load": "/base-mcore"}}
