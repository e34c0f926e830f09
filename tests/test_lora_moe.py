"""LoRA on MoE models: adapters on every routed expert (one per expert, split over expert-TP) and on
the shared expert; training parity across expert-parallel layouts; the PEFT export at EP=2 (per-expert
tensors under transformers' on-disk names) equal at every layout, folding to the merged export, and
importing back bitwise; transformers + peft load an EP-trained Mixtral adapter with the merged
export's logits; LoRA DPO at EP=2; all-router refused.

Tiny qwen2_moe (4 experts, top-2, a gated shared expert) and mixtral (tests/tiny_models.py) with
SmolLM2's tokenizer, real `megatron` runs under torchrun with gloo.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from conftest import logged, make_tiny_model, run_cli, run_megatron, tiered
from test_dpo import FIGURES, pairs  # noqa: F401  (pairs: 32 short preference rows, a fixture)

ITERS = 5
RTOL = 1e-5
LORA = ["--train_type", "lora", "--lora_dropout", "0", "--lr", "1e-3"]
KEYS = ("loss", "grad_norm", "trainable_params")


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    from megaswift.assets import fetch_smollm2

    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("lora-moe-tok"), tokenizer_dir=fetch_smollm2())


def _sft(model, dataset, save, *extra, iters=ITERS):
    return ["sft", "--model", str(model), "--dataset", dataset, "--save", str(save), "--train_iters", str(iters),
            "--global_batch_size", "8", "--micro_batch_size", "2", "--max_length", "512", "--add_version", "false",
            "--moe_aux_loss_coeff", "1e-2", *LORA, *extra]


def _run(args, nproc=1):
    proc = run_megatron(args, nproc=nproc, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _figures(save):
    return {k: logged(save, k) for k in KEYS}


@pytest.fixture(scope="module")
def reference(moe_model, dataset, tmp_path_factory):
    """The single-process LoRA run: the parity reference (and the run exported below)."""
    save = tmp_path_factory.mktemp("lora-moe-ref") / "run"
    _run(_sft(moe_model, dataset, save))
    return _figures(save), save


LAYOUTS = {
    "ep2": (2, ["--expert_model_parallel_size", "2"]),
    "tp2_ep2_sp": (4, ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true",  # expert-TP 2 too
                       "--expert_model_parallel_size", "2"]),
}


def _assert_parity(got, want, keys=KEYS):
    for key in keys:
        assert sorted(got[key]) == sorted(want[key]), (key, sorted(got[key]))
        for it, w in want[key].items():
            assert abs(got[key][it] - w) <= RTOL * abs(w), f"{key} at iteration {it}: {got[key][it]} vs {w}"


@pytest.mark.parametrize("layout", tiered(sorted(LAYOUTS), {"tp2_ep2_sp"}))
def test_lora_moe_loss_parity_with_one_process(layout, moe_model, dataset, reference, tmp_path):
    """Losses, gradient norms and the trainable-parameter count equal the single-process run's."""
    want, ref_save = reference
    nproc, flags = LAYOUTS[layout]
    _run(_sft(moe_model, dataset, tmp_path / "run", *flags), nproc=nproc)
    got = _figures(tmp_path / "run")
    print(f"{layout}: loss {got['loss']} grad_norm {got['grad_norm']} (one process: {want['loss']} {want['grad_norm']})")
    _assert_parity(got, want)
    assert got["loss"][ITERS] < got["loss"][1]
    # adapters on every routed expert (global numbers in the checkpoint) and on the shared expert
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(FileSystemReader(str(tmp_path / "run" / f"iter_{ITERS:07d}")).read_metadata().state_dict_metadata)
    model_keys = {k for k in keys if k.startswith("decoder.")}
    assert all(".lora_A." in k or ".lora_B." in k for k in model_keys), sorted(model_keys)[:5]
    assert any("shared_experts.linear_fc1.lora_A" in k for k in model_keys)
    assert any(".experts.experts." in k and "linear_fc2.lora_B" in k for k in model_keys), sorted(model_keys)


def _fold(base: dict, adapter: dict, scale: float) -> dict:
    """The HF base tensors with every PEFT LoRA module folded in by hand: W + scale * B @ A."""
    out = dict(base)
    for k, a in adapter.items():
        if k.endswith(".lora_A.weight"):
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[k.replace("lora_A", "lora_B")]
            out[module + ".weight"] = base[module + ".weight"] + scale * (b.double() @ a.double()).float()
    return out


def test_peft_export_at_ep2_equals_one_process_and_folds_to_the_merged_export(moe_model, reference, tmp_path):
    """The single-process qwen2_moe run exported at EP=2: per-expert PEFT tensors under transformers'
    on-disk names (gate/up_proj share fc1's A, B split), bitwise those of a one-process export and of a
    TP=2 x EP=2 one; folded
    into the HF base by hand (W + alpha/r * B @ A per module) they give the merged EP=2 export."""
    from safetensors.torch import load_file

    from conftest import read_safetensors_dir

    _, run = reference
    ep2 = ["--expert_model_parallel_size", "2"]
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--save", str(tmp_path / "peft"), *ep2], nproc=2)
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--merge_lora", "true",
          "--save", str(tmp_path / "merged"), *ep2], nproc=2)
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--save", str(tmp_path / "peft1")])
    # and at TP=2 x EP=2 (expert-TP 2: each expert's fc1 B split into gate/up halves per rank)
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--save", str(tmp_path / "peft4"),
          "--tensor_model_parallel_size", "2", *ep2], nproc=4)
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    for other in ("peft1", "peft4"):
        one = load_file(tmp_path / other / "adapter_model.safetensors")
        assert sorted(saved) == sorted(one) and all(torch.equal(saved[k], one[k]) for k in saved), other
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"]), config["target_modules"]
    p = "base_model.model.model.layers.1.mlp."
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"{p}experts.{e}.{proj}.lora_A.weight" in saved and f"{p}experts.{e}.{proj}.lora_B.weight" in saved
        # fc1 = [gate; up] has one A: gate_proj's and up_proj's are the same
        assert torch.equal(saved[f"{p}experts.{e}.gate_proj.lora_A.weight"], saved[f"{p}experts.{e}.up_proj.lora_A.weight"])
        assert saved[f"{p}experts.{e}.down_proj.lora_B.weight"].abs().max() > 0
    assert f"{p}shared_expert.gate_proj.lora_A.weight" in saved
    # each expert's A is its own (initialised from its global expert index)
    assert not torch.equal(saved[f"{p}experts.0.down_proj.lora_A.weight"], saved[f"{p}experts.2.down_proj.lora_A.weight"])
    assert len(saved) == 4 * 2 * (4 + 3 + 4 * 3)  # layers x (A, B) x (q/k/v/o + shared gate/up/down + 4 experts x 3)
    base, merged = read_safetensors_dir(moe_model), read_safetensors_dir(tmp_path / "merged")
    folded = _fold(base, saved, config["lora_alpha"] / config["r"])
    assert sorted(folded) == sorted(merged)
    worst = max((folded[k] - merged[k]).abs().max().item() for k in merged)
    moved = max((base[k] - merged[k]).abs().max().item() for k in merged)
    print(f"PEFT tensors folded by hand vs merged export (EP=2): max |diff| {worst:.3e} (merged vs base {moved:.3e})")
    assert worst <= 1e-6 and moved > 1e-4
    # the PEFT folder imports back at EP=2 (each rank its experts) and re-exports bitwise
    _run(["export", "--adapters", str(tmp_path / "peft"), "--model", str(moe_model), "--to_mcore", "true",
          "--save", str(tmp_path / "imported"), *ep2], nproc=2)
    _run(["export", "--adapter_load", str(tmp_path / "imported"), "--to_hf", "true", "--save", str(tmp_path / "again")])
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(again) == sorted(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_mixtral_peft_export_at_ep2_loads_in_peft_and_equals_the_merged_export(dataset, tmp_path):
    """A Mixtral LoRA run trained at EP=2, exported at EP=2 as PEFT and merged: transformers + peft
    load the per-expert adapter (fusing it into transformers' 3-D experts) with the logits of the
    merged export. (Mixtral: peft 0.21 converts per-expert adapters of mixtral and qwen3_moe-style
    models, not qwen2_moe's, and drops a same-named dense MLP's or shared expert's LoRA there.)"""
    import peft
    from transformers import AutoModelForCausalLM

    from megaswift.assets import fetch_smollm2

    model_dir = make_tiny_model("mixtral", tmp_path / "hf", tokenizer_dir=fetch_smollm2())
    ep2 = ["--expert_model_parallel_size", "2"]
    run = tmp_path / "run"
    args = _sft(model_dir, dataset, run, *ep2, iters=3)
    args[args.index("1e-3")] = "1e-2"  # B far from zero
    _run(args, nproc=2)
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--save", str(tmp_path / "peft"), *ep2], nproc=2)
    _run(["export", "--adapter_load", str(run), "--to_hf", "true", "--merge_lora", "true",
          "--save", str(tmp_path / "merged"), *ep2], nproc=2)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"])
    base = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    assert {"gate_up_proj", "down_proj"} <= set(model.peft_config["default"].target_parameters or ())
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with_adapter, folded, plain = _logits(model, ids), _logits(merged, ids), _logits(base(), ids)
    diff = (with_adapter - folded).abs().max().item()
    moved = (plain - folded).abs().max().item()
    print(f"mixtral: PEFT-loaded (EP=2 export) vs merged export (EP=2): max |logit diff| {diff:.3e}; "
          f"merged vs base {moved:.3e}")
    assert diff <= 1e-5 and moved > 1e-3
    # peft holds exactly the adapter: folding it (merge_and_unload) gives the merged export's weights
    unloaded = model.merge_and_unload().state_dict()
    worst = max((unloaded[k] - v).abs().max().item() for k, v in merged.state_dict().items())
    print(f"mixtral: peft merge_and_unload vs merged export: max |weight diff| {worst:.3e}")
    assert worst <= 1e-6


def test_all_router_is_refused_before_any_work(moe_model, dataset, tmp_path):
    """megatron's TopKRouter is no parallel linear LoRA wraps: all-router fails before any work."""
    proc = run_cli(_sft(moe_model, dataset, tmp_path / "run", "--target_modules", "all-linear", "all-router"))
    assert proc.returncode != 0 and "--target_modules all-router" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_lora_dpo_at_ep2_equals_one_process(moe_model, pairs, tmp_path):  # noqa: F811
    """LoRA DPO (the reference: the policy with its adapters off) on qwen2_moe at EP=2: losses,
    rewards, log-probs and gradient norms equal the single-process run's."""
    def args(save, *extra):
        return ["rlhf", "--rlhf_type", "dpo", "--model", str(moe_model), "--dataset", pairs, "--save", str(save),
                "--train_iters", "4", "--global_batch_size", "8", "--micro_batch_size", "2", "--max_length", "256",
                "--add_version", "false", "--train_dataloader_shuffle", "false", "--moe_aux_loss_coeff", "1e-2",
                *LORA, *extra]

    _run(args(tmp_path / "one"))
    _run(args(tmp_path / "ep2", "--expert_model_parallel_size", "2"), nproc=2)
    keys = (*FIGURES, "grad_norm")
    want = {k: logged(tmp_path / "one", k) for k in keys}
    got = {k: logged(tmp_path / "ep2", k) for k in keys}
    print(f"DPO EP=2: loss {got['loss']} grad_norm {got['grad_norm']} (one process: {want['loss']} {want['grad_norm']})")
    for key in keys:
        assert sorted(got[key]) == sorted(want[key]) == [1, 2, 3, 4], (key, got[key])
        for it, w in want[key].items():
            assert abs(got[key][it] - w) <= RTOL * abs(w) + 1e-7, f"{key} at iteration {it}: {got[key][it]} vs {w}"
    assert want["rewards/margins"][4] != 0.0  # the adapters moved the policy off its reference
