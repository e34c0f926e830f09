"""Megatron-SWIFT's flag surface: every flag of its argument list parses with its name and default,
the generated flag table is current, errors are one line, and flags that cannot act here say so."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from conftest import logged, ok, run_cli, run_megatron

from megaswift.args import parser as flag_parser
from megaswift.args.job import GROUPS, parse_job
from megaswift.args.rlhf import RLHFArgs

SEED = Path(__file__).parent / "data" / "megatron_swift_flags.tsv"


def seed_flags() -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in SEED.read_text().splitlines() if line and not line.startswith("#")]


def _fields():
    out = {}
    for cls in GROUPS + (RLHFArgs,):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f.name] = (f, hints[f.name])
    return out


def _sample(f, tp) -> list[str]:
    """A value for the flag: its default where it has one, else one of its type."""
    default = flag_parser.default_of(f)
    if isinstance(default, list):
        return [str(v) for v in default] or ["x"]
    if default is not None:
        return [str(default).lower() if isinstance(default, bool) else str(default)]
    if "choices" in f.metadata:
        return [str(f.metadata["choices"][0])]
    base = flag_parser._base_type(tp)
    return {bool: ["true"], int: ["2"], float: ["0.5"]}.get(base, ["x"])


def test_every_flag_of_the_seed_parses():
    """All 186 flags of Megatron-SWIFT's list (its `moe_ffn_hidden_siz` typo included) are accepted by
    argparse, each set to its default (or a value of its type)."""
    fields = _fields()
    parser = flag_parser.build_parser(GROUPS + (RLHFArgs,), "megatron rlhf")
    flags = seed_flags()
    assert len({name for _, name in flags}) == 186
    for _, name in flags:
        dest = flag_parser.ALIASES.get(name, name)
        assert dest in fields, f"--{name} is not a megaswift flag"
        values = _sample(*fields[dest])
        ns, unknown = parser.parse_known_args([f"--{name}", *values])
        assert not unknown and hasattr(ns, dest), name


def test_seed_defaults():
    """The defaults Megatron-SWIFT documents, as a bare `megatron sft` parses them."""
    job = parse_job(["--model", "/models/Qwen2.5-7B-Instruct", "--dataset", "d.jsonl", "--train_iters", "10"], "sft")
    t, m, g = job.train, job.megatron, job.arch
    assert (t.micro_batch_size, t.global_batch_size, t.log_interval, t.save_interval, t.eval_interval,
            t.eval_iters) == (1, 16, 5, 500, 500, -1)
    assert (t.recompute_granularity, t.recompute_modules) == ("selective", ["core_attn"])
    assert t.save == "megatron_output/Qwen2.5-7B-Instruct" and t.add_version
    assert (t.lr, t.min_lr, t.weight_decay, t.clip_grad, t.adam_beta2, t.sgd_momentum) == (1e-5, 0.0, 0.1, 1.0, 0.95, 0.9)
    assert (t.use_distributed_optimizer, t.calculate_per_token_loss, t.lr_decay_style) == (True, True, "cosine")
    assert (m.num_workers, m.distributed_timeout_minutes, m.tensorboard_log_interval, m.attention_softmax_in_fp32,
            m.cross_entropy_fusion_impl, m.dataloader_type, m.ckpt_format) == (4, 300000, 1, True, "native", "cyclic",
                                                                              "torch_dist")
    assert (g.attention_dropout, g.hidden_dropout) == (0.0, 0.0)
    assert (job.runtime.attention_backend, job.runtime.transformer_impl) == ("flash", "transformer_engine")
    assert (job.tuner.lora_rank, job.tuner.lora_alpha, job.tuner.lora_dropout) == (8, 32, 0.05)
    assert job.swift.ddp_timeout == 18000000
    lora = parse_job(["--model", "m", "--dataset", "d", "--train_iters", "1", "--train_type", "lora"], "sft")
    assert lora.train.lr == 1e-4
    rlhf = parse_job(["--model", "m", "--dataset", "d", "--train_iters", "1"], "rlhf")
    assert (rlhf.train.calculate_per_token_loss, rlhf.data.loss_scale) == (False, "last_round")


def test_flag_table_is_generated_from_the_dataclasses():
    from megaswift.args.table import render

    table = (Path(__file__).parents[1] / "docs" / "flags.md").read_text()
    assert table == render(), "docs/flags.md is stale: python -m megaswift.args.table > docs/flags.md"
    for _, name in seed_flags():
        assert f"| `--{flag_parser.ALIASES.get(name, name)}` |" in table, name
    for cls in GROUPS + (RLHFArgs,):
        for f in dataclasses.fields(cls):
            assert f"| `--{f.name}` |" in table, f.name


def test_help_lists_the_seed_sections_with_defaults():
    proc = run_cli(["sft", "--help"])
    assert proc.returncode == 0
    out = proc.stdout
    titles = [line[:-len(" flags:")] for line in out.splitlines() if line.endswith(" flags:")]
    assert titles[:9] == ["training", "learning rate", "regularization", "checkpoint", "distributed", "logging",
                          "evaluation", "fp8", "mixed precision"]
    assert {"model", "moe", "mla", "tuner", "data", "template"} <= set(titles)
    assert "ModelArgs" not in out and "TrainArgs" not in out
    assert "--save_interval N" in out and "(default: 500)" in out
    assert "--num_workers N" in out and "no effect here" in out
    assert out.index("--lr X") > out.index("learning rate flags:")


def test_unknown_flags_and_commands_are_one_line():
    proc = run_cli(["sft", "--model", "m", "--dataset", "d", "--train_iters", "1", "--lr_decay_stile", "cosine"])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "megatron sft: error: unknown flag --lr_decay_stile; did you mean --lr_decay_style" in proc.stderr
    # Megatron-LM's dashed spelling is the same flag
    assert parse_job(["--model", "m", "--dataset", "d", "--train-iters", "3", "--tensor-model-parallel-size", "2"],
                     "sft").parallel.tensor_model_parallel_size == 2
    proc = run_cli(["stf", "--model", "m"])
    assert proc.returncode == 2 and "unknown command 'stf' (did you mean sft?)" in proc.stderr
    assert "commands: export, sft, pt, rlhf" in proc.stderr
    proc = run_cli(["sft", "--model", "m", "--dataset", "d", "--train_iters", "x"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--train_iters: invalid int value" in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--fp8_format", "e4m3"], "--fp8_format e4m3: FP8 training is not implemented yet"),
    (["--ckpt_format", "zarr"], "--ckpt_format zarr: megaswift saves and loads torch_dist checkpoints only"),
    (["--enable_dft_loss", "true"], "--enable_dft_loss true: DFT loss is not implemented yet"),
    (["--task_type", "seq_cls"], "--task_type seq_cls: megaswift trains causal language models only"),
    (["--sequence_parallel_size", "2"], "--context_parallel_size"),
    (["--extra_megatron_kwargs", '{"attention_sofmax_in_fp32": false}'],
     "attention_sofmax_in_fp32 (did you mean attention_softmax_in_fp32?) not a megatron-core TransformerConfig field"),
    (["--exp_avg_dtype", "bf16"], "--exp_avg_dtype bf16 needs --use_precision_aware_optimizer true"),
    (["--use_precision_aware_optimizer", "true"], "--use_precision_aware_optimizer true needs CUDA"),
])
def test_flags_that_would_change_results_are_refused_before_any_work(model_dir, dataset, tmp_path, flags, message):
    proc = run_cli(["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", "1",
                    "--save", str(tmp_path / "out"), *flags])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value", [("num_layers", "3"), ("hidden_size", "128"), ("rotary_base", "5000"),
                                         ("untie_embeddings_and_output_weights", "true"),
                                         ("padded_vocab_size", "1000")])
def test_model_flags_that_contradict_config_json_name_both_values(model_dir, dataset, tmp_path, flag, value):
    cfg = json.loads((model_dir / "config.json").read_text())
    proc = run_cli(["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", "1",
                    "--save", str(tmp_path / "out"), f"--{flag}", value])
    assert proc.returncode == 2, proc.stderr
    assert f"--{flag} {value} contradicts the checkpoint, whose config.json gives" in proc.stderr, proc.stderr
    if flag == "num_layers":
        assert f"gives {cfg['num_hidden_layers']}" in proc.stderr


def test_megatron_swift_flags_train_with_dropout_logging_and_no_effect_notes(model_dir, dataset, tmp_path):
    """Flags every published Megatron-SWIFT command passes run; the ones with no effect here are
    logged once with the reason; dropout takes effect; the model flags that agree with config.json
    are accepted; console lines every --log_interval, logging.jsonl every step."""
    cfg = json.loads((model_dir / "config.json").read_text())
    common = ["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", "3", "--global_batch_size", "4",
              "--add_version", "false", "--lr", "1e-3", "--optimizer", "sgd", "--sgd_momentum", "0.5",
              "--clip_grad", "0.01"]
    base = ok(run_megatron([*common, "--save", str(tmp_path / "base")]))
    assert "[3/3" in base.stderr and "[1/3" not in base.stderr   # --log_interval 5: the last step only
    same = ok(run_megatron([
        *common, "--save", str(tmp_path / "same"), "--num_workers", "8", "--cross_entropy_loss_fusion", "true",
        "--attention_backend", "flash", "--dataloader_type", "single", "--num_layers", str(cfg["num_hidden_layers"]),
        "--hidden_size", str(cfg["hidden_size"]), "--no_rope_fusion", "true", "--manual_gc", "true",
        "--manual_gc_interval", "1", "--log_interval", "1", "--deterministic_mode", "true",
        "--distributed_timeout_minutes", "10"]))
    assert same.stderr.count("--num_workers 8 has no effect here: batches are collated in the training process") == 1
    assert "--cross_entropy_loss_fusion true has no effect here" in same.stderr
    assert "--dataloader_type single has no effect here" in same.stderr
    assert "[1/3" in same.stderr and "[2/3" in same.stderr
    a, b = logged(tmp_path / "base"), logged(tmp_path / "same")
    assert sorted(a) == [1, 2, 3]
    for it in a:   # the no-effect flags and agreeing model flags change nothing; SGD + clipping shows it
        assert abs(a[it] - b[it]) < 1e-6, (it, a[it], b[it])
    gn_a, gn_b = logged(tmp_path / "base", "grad_norm"), logged(tmp_path / "same", "grad_norm")
    assert all(abs(gn_a[i] - gn_b[i]) < 1e-6 for i in gn_a)
    drop = ok(run_megatron([*common, "--save", str(tmp_path / "drop"), "--hidden_dropout", "0.3",
                            "--attention_dropout", "0.3"]))
    c = logged(tmp_path / "drop")
    assert abs(c[1] - a[1]) > 1e-4, (a[1], c[1])   # dropout acts while training
    del drop


def test_max_epochs_stops_training_before_train_iters(model_dir, dataset, tmp_path):
    proc = ok(run_megatron(["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", "50",
                            "--max_epochs", "1", "--global_batch_size", "16", "--save", str(tmp_path / "o"),
                            "--add_version", "false", "--split_dataset_ratio", "0", "--recompute_granularity", "none"]))
    # no --max_length: the model's max_position_embeddings (256), longer rows dropped (--truncation_strategy delete)
    assert "--max_length 256: the model's max_position_embeddings" in proc.stderr
    assert "--max_epochs 1 is reached after 2 of --train_iters 50 iterations" in proc.stderr
    assert max(logged(tmp_path / "o")) == 2


def test_wsd_schedule_with_megatron_lm_flags(model_dir, dataset, tmp_path):
    """--lr_decay_style WSD: constant, then --lr_wsd_decay_iters of annealing to --min_lr."""
    ok(run_megatron(["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", "4",
                     "--global_batch_size", "2", "--save", str(tmp_path / "o"), "--add_version", "false",
                     "--lr", "1e-3", "--min_lr", "1e-4", "--lr_decay_style", "WSD", "--lr_wsd_decay_iters", "2",
                     "--lr_wsd_decay_style", "linear", "--recompute_granularity", "none"]))
    lrs = logged(tmp_path / "o", "lr")
    assert [round(lrs[i], 10) for i in (1, 2, 3, 4)] == [1e-3, 1e-3, 5.5e-4, 1e-4]
