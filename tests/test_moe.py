"""Mixture-of-experts: exact conversion at expert-parallel layouts, training parity across layouts,
exact resume with expert bias, export of an EP-trained run, and layout errors before any work.

Tiny random models of each MoE family (tests/tiny_models.py: 4 experts, top-2; qwen3_moe with a
dense layer between MoE layers, qwen2_moe with a gated shared expert, mixtral), real `megatron`
runs under torchrun with gloo.
"""

from __future__ import annotations

import pytest

from conftest import (assert_bitwise_equal, logged, make_tiny_model, ok, precision_figures, read_safetensors_dir,
                      run_cli, run_megatron, tiered)
from test_training import _kill_after_checkpoint

MOE = ["qwen3_moe", "qwen2_moe", "mixtral"]
ITERS = 5
RTOL = 1e-5


def _precise(out: str) -> None:
    figures = precision_figures(out)
    assert set(figures) == {"padded", "packed"}, out[-3000:]
    for layout, (max_diff, agree) in figures.items():
        assert max_diff <= 1e-4 and agree == 1.0, (layout, max_diff, agree)


def _run(args, nproc=1):
    proc = run_megatron(args, nproc=nproc, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("family", MOE)
def test_round_trip_at_expert_parallel_layouts(family, tiny_model_dir, tmp_path):
    """EP=2 write -> TP=2 x EP=2 (expert-TP 1) read: every HF tensor equal, and logits equal to
    transformers at each layout."""
    hf = tiny_model_dir(family)
    ep = ["--expert_model_parallel_size", "2"]
    _precise(_run(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(tmp_path / "ep2"),
                   "--test_convert_precision", "true", *ep], nproc=2))
    _precise(_run(["export", "--load", str(tmp_path / "ep2"), "--to_hf", "true", "--save", str(tmp_path / "hf1"),
                   "--tensor_model_parallel_size", "2", "--expert_tensor_parallel_size", "1",
                   "--test_convert_precision", "true", *ep], nproc=2))
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf1"))


def test_pp2_ep2_checkpoint_loads_at_ep1(tiny_model_dir, tmp_path):
    """A checkpoint written at PP=2 x EP=2 loads at EP=1 (megatron's sharded state dict reshards
    experts), bitwise; qwen2_moe: routed and shared experts, both pipeline stages."""
    hf = tiny_model_dir("qwen2_moe")
    _run(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(tmp_path / "pp2ep2"),
          "--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2"], nproc=4)
    _run(["export", "--load", str(tmp_path / "pp2ep2"), "--to_hf", "true", "--save", str(tmp_path / "hf")])
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


def test_fused_expert_layout_reads_as_per_expert(tiny_model_dir, tmp_path):
    """A checkpoint saved in transformers' in-memory layout (one 3-D tensor per layer for all
    experts) converts; --to_hf writes the per-expert layout, equal to transformers' own save."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = tiny_model_dir("qwen3_moe")
    fused = tmp_path / "fused"
    shutil.copytree(hf, fused)
    (fused / "model.safetensors").unlink()
    state = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert state["model.layers.0.mlp.experts.gate_up_proj"].dim() == 3
    save_file({k: v.contiguous() for k, v in state.items()}, fused / "model.safetensors", metadata={"format": "pt"})
    _precise(_run(["export", "--model", str(fused), "--to_mcore", "true", "--save", str(tmp_path / "mc"),
                   "--test_convert_precision", "true"]))
    _run(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true", "--save", str(tmp_path / "hf")])
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


# -- training ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """qwen2_moe (routed experts + gated shared expert) with SmolLM2's tokenizer, for training."""
    from megaswift.assets import fetch_smollm2

    return make_tiny_model("qwen2_moe", tmp_path_factory.mktemp("moe-tok"), tokenizer_dir=fetch_smollm2())


def _sft(model, dataset, save, *extra, iters=ITERS):
    return ["sft", "--model", str(model), "--dataset", dataset, "--save", str(save), "--train_iters", str(iters),
            "--global_batch_size", "8", "--micro_batch_size", "2", "--lr", "1e-4", "--max_length", "512",
            "--add_version", "false", "--moe_aux_loss_coeff", "1e-2", "--moe_z_loss_coeff", "1e-3", *extra]


KEYS = ("loss", "grad_norm", "load_balancing_loss", "z_loss", "moe_load_cv")


def _figures(save):
    return {k: logged(save, k) for k in KEYS}


# megatron logs the z-loss as the mean over sequence-parallel ranks of each rank's own token mean
# (its gradient is exact): a logged figure, within 1e-4
TOLERANCE = {"z_loss": 1e-4}


def _assert_parity(got, want):
    for key in KEYS:
        assert sorted(got[key]) == list(range(1, ITERS + 1)), (key, sorted(got[key]))
        for it, w in want[key].items():
            tol = TOLERANCE.get(key, RTOL)
            assert abs(got[key][it] - w) <= tol * abs(w), f"{key} at iteration {it}: {got[key][it]} vs {w}"


@pytest.fixture(scope="module")
def reference(moe_model, dataset, tmp_path_factory):
    save = tmp_path_factory.mktemp("moe-ref") / "run"
    _run(_sft(moe_model, dataset, save))
    return _figures(save), save


LAYOUTS = {
    "ep2_dp2_distopt": (2, ["--expert_model_parallel_size", "2"]),
    # with the speed options Megatron-SWIFT's MoE commands pass: portable equivalents here, same numbers
    "ep2_dp2_ddp": (2, ["--expert_model_parallel_size", "2", "--use_distributed_optimizer", "false",
                        "--moe_grouped_gemm", "true", "--moe_permute_fusion", "true",
                        "--moe_shared_expert_overlap", "true"]),
    "tp2_ep2_sp": (4, ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true",  # expert-TP 2 too
                       "--expert_model_parallel_size", "2"]),
    "pp2_ep2": (4, ["--pipeline_model_parallel_size", "2", "--expert_model_parallel_size", "2"]),
    # every MoE recompute module (moe_act: kept, logged, without grouped-GEMM experts)
    "ep2_recompute": (2, ["--expert_model_parallel_size", "2", "--recompute_granularity", "selective",
                          "--recompute_modules", "core_attn", "moe", "layernorm", "moe_act", "mlp"]),
    "cp2_ep2": (2, ["--context_parallel_size", "2", "--expert_model_parallel_size", "2"]),
    "pp2_uneven": (2, ["--pipeline_model_parallel_size", "2", "--decoder_first_pipeline_num_layers", "1"]),
}


@pytest.mark.parametrize("layout", tiered(sorted(LAYOUTS), {"ep2_dp2_ddp", "pp2_ep2", "ep2_recompute", "cp2_ep2", "pp2_uneven"}))
def test_loss_parity_with_one_process(layout, moe_model, dataset, reference, tmp_path):
    """Losses, gradient norms, router losses and expert load equal the single-process run's."""
    nproc, flags = LAYOUTS[layout]
    out = _run(_sft(moe_model, dataset, tmp_path / "run", *flags), nproc=nproc)
    _assert_parity(_figures(tmp_path / "run"), reference[0])
    assert "lb_loss" in out and "expert_load_cv" in out  # on the console too
    if "--moe_grouped_gemm" in flags:  # one logged line per fallback, on rank 0 only
        for flag in ("--moe_grouped_gemm true", "--moe_permute_fusion true", "--moe_shared_expert_overlap true"):
            assert out.count(flag + ":") == 1, flag
    if layout == "ep2_dp2_distopt":  # the EP-trained checkpoint exports; transformers' logits match it
        _precise(_run(["export", "--load", str(tmp_path / "run"), "--to_hf", "true", "--save", str(tmp_path / "hf"),
                       "--expert_model_parallel_size", "2", "--test_convert_precision", "true"], nproc=2))


@pytest.mark.parametrize("flags", [
    ["--moe_expert_capacity_factor", "1.0", "--moe_token_drop_policy", "probs"],
    pytest.param(["--moe_expert_capacity_factor", "1.0", "--moe_token_drop_policy", "position"], marks=pytest.mark.slow),
    pytest.param(["--moe_token_dispatcher_type", "allgather"], marks=pytest.mark.slow),  # pads micro-batches to --max_length: its own reference
], ids=["capacity1_probs", "capacity1_position", "allgather"])
def test_ep2_equals_its_own_single_process_run(flags, moe_model, dataset, reference, tmp_path):
    """Capacity factor 1.0 drops tokens the same at EP=2 as in one process, with either drop
    policy; the allgather dispatcher gives at EP=2 what it gives in one process."""
    _run(_sft(moe_model, dataset, tmp_path / "one", *flags))
    _run(_sft(moe_model, dataset, tmp_path / "ep2", *flags, "--expert_model_parallel_size", "2"), nproc=2)
    one = _figures(tmp_path / "one")
    _assert_parity(_figures(tmp_path / "ep2"), one)
    if "--moe_expert_capacity_factor" in flags:  # tokens were dropped: not the dropless run
        assert one["grad_norm"] != reference[0]["grad_norm"]


@pytest.mark.slow
def test_resume_with_expert_bias_equals_uninterrupted(dataset, tmp_path_factory, tmp_path):
    """Sigmoid routing with DeepSeek-V3's expert bias at EP=2: SIGKILL after iteration 3, resume;
    iterations 4-6 equal the uninterrupted run (the bias is saved and restored)."""
    from megaswift.assets import fetch_smollm2

    model = make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("q3moe-tok"), tokenizer_dir=fetch_smollm2())
    flags = ["--expert_model_parallel_size", "2", "--moe_router_score_function", "sigmoid",
             "--moe_router_enable_expert_bias", "true", "--moe_router_bias_update_rate", "1e-2"]
    full = tmp_path / "full"
    _run(_sft(model, dataset, full, *flags, iters=6), nproc=2)
    killed = tmp_path / "killed"
    _kill_after_checkpoint(_sft(model, dataset, killed, "--save_interval", "3", *flags, iters=6), killed, 3, 2)
    (killed / "logging.jsonl").unlink(missing_ok=True)
    resumed = tmp_path / "resumed"
    args = _sft(model, dataset, resumed, *flags, iters=6)
    args[args.index("--model"):args.index("--model") + 2] = ["--load", str(killed)]
    out = _run(args, nproc=2)
    assert "resumed from" in out
    for key in ("loss", "grad_norm", "moe_load_cv"):
        want, got = logged(full, key), logged(resumed, key)
        assert sorted(got) == [4, 5, 6]
        for it in got:
            assert got[it] == want[it], f"{key} at iteration {it}: resumed {got[it]} vs uninterrupted {want[it]}"


@pytest.mark.parametrize("flags, message", [
    (["--expert_model_parallel_size", "3"], "--expert_model_parallel_size 3 does not divide the model's 4 experts"),
    (["--moe_router_topk", "5"], "--moe_router_topk 5 must be between 1 and the model's 4 experts"),
    (["--tensor_model_parallel_size", "2"], "needs --sequence_parallel true"),
    (["--num_experts", "8"], "--num_experts 8 does not match the model's config.json"),
], ids=["ep_not_dividing", "topk_over_experts", "tp_without_sp", "num_experts_mismatch"])
def test_bad_moe_layouts_fail_before_any_work(flags, message, tiny_model_dir, dataset, tmp_path):
    proc = run_cli(_sft(tiny_model_dir("qwen2_moe"), dataset, tmp_path / "run", *flags))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_expert_layout_over_world_size_fails_before_any_work(tiny_model_dir, tmp_path):
    proc = run_megatron(["export", "--model", str(tiny_model_dir("qwen2_moe")), "--to_mcore", "true", "--save",
                         str(tmp_path / "mc"), "--expert_model_parallel_size", "2",
                         "--expert_tensor_parallel_size", "2"], nproc=2)
    assert proc.returncode != 0
    assert "--expert_model_parallel_size 2 x --expert_tensor_parallel_size 2 = 4 does not divide" in proc.stderr
    assert not (tmp_path / "mc").exists()


def test_dense_model_refuses_expert_parallel(tiny_model_dir, tmp_path):
    proc = run_cli(["export", "--model", str(tiny_model_dir("llama")), "--to_mcore", "true", "--save",
                    str(tmp_path / "mc"), "--expert_model_parallel_size", "2"])
    assert proc.returncode != 0 and "need an MoE model" in proc.stderr


def test_deepseek_v3_trains_at_ep2_and_exports_its_updated_expert_bias(dataset, tmp_path_factory, tmp_path):
    """DeepSeek-V3 (MLA, sigmoid routing with expert bias, shared expert, a dense first layer): EP=2
    equals one process over 5 steps; the bias moved towards balance and comes back as
    `e_score_correction_bias`, with transformers' logits matching the trained checkpoint's."""
    import torch

    from megaswift.assets import fetch_smollm2

    model = make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("ds3-tok"), tokenizer_dir=fetch_smollm2())
    _run(_sft(model, dataset, tmp_path / "one"))
    _run(_sft(model, dataset, tmp_path / "ep2", "--expert_model_parallel_size", "2"), nproc=2)
    keys = ("loss", "grad_norm", "load_balancing_loss", "moe_load_cv")
    for key in keys:
        want, got = logged(tmp_path / "one", key), logged(tmp_path / "ep2", key)
        assert sorted(got) == list(range(1, ITERS + 1))
        for it, w in want.items():
            assert abs(got[it] - w) <= RTOL * abs(w), f"{key} at iteration {it}: {got[it]} vs {w}"
    _precise(_run(["export", "--load", str(tmp_path / "ep2"), "--to_hf", "true", "--save", str(tmp_path / "hf"),
                   "--expert_model_parallel_size", "2", "--test_convert_precision", "true"], nproc=2))
    before, after = read_safetensors_dir(model), read_safetensors_dir(tmp_path / "hf")
    bias = [k for k in before if k.endswith("e_score_correction_bias")]
    assert bias and all(after[k].dtype == torch.float32 for k in bias)
    assert all(not torch.equal(before[k], after[k]) for k in bias)  # updated by the routed token counts
