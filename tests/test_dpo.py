"""`megatron rlhf --rlhf_type dpo`: iteration 1 equals transformers + TRL's loss on the same rows
with a reference that differs from the policy, loss parity across layouts, LoRA's adapters-off
reference, bad input.

The chain of proof: `test_preference_loss.py` shows our loss functions equal TRL's DPOTrainer
given the same per-sequence log-probs; here the log-probs megatron computes (padding-free pairs,
any layout) equal those transformers computes on the same tokenised pairs.
"""

from __future__ import annotations

import pytest
import torch

from conftest import data_args, logged, make_tiny_model, ok, run_cli, run_megatron, tiered
from test_lora import LAYOUTS  # the layouts the issues name: TP=2+SP, PP=2, CP=2, DP=2 with the distributed optimizer

ITERS = 4
RTOL = 1e-5
FIGURES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """32 short preference rows (ms-swift's messages + rejected_response).

    Short answers keep the sequence log-probs small (a random model's are ~ -10.8 per token): the
    rewards are differences of log-probs, and a 2000-nat sum in float32 carries ~2e-4 of rounding,
    which no two implementations share; at ~100 nats the figures agree to 1e-5 relative."""
    import json

    words = ["red", "blue", "green", "seven", "river", "stone", "quiet", "bright", "north", "paper"]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w") as f:
        for i in range(32):
            a, b = words[i % 10], words[(3 * i + 1) % 10]
            row = {"messages": [{"role": "user", "content": f"Name a word like {a}" + " please" * (i % 3)},
                                {"role": "assistant", "content": f"{b} {a}." if i % 2 else f"{a}, of course."}],
                   "rejected_response": f"No {b}" + " no" * (i % 4)}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ref_mcore(model_dir, tmp_path_factory):
    """A *different* tiny llama (other seed, same tokenizer) as an MCore checkpoint: the reference."""
    from megaswift.assets import fetch_smollm2

    root = tmp_path_factory.mktemp("dpo-ref")
    hf = make_tiny_model("llama", root / "hf", seed=1, tokenizer_dir=fetch_smollm2())
    ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(root / "mcore")]))
    return hf, root / "mcore"


def _args(model_dir, pairs, ref, save, iters=ITERS, *extra):
    return ["rlhf", "--rlhf_type", "dpo", "--model", str(model_dir), "--ref_load", str(ref), "--dataset", pairs,
            "--save", str(save), "--train_iters", str(iters), "--global_batch_size", "8", "--micro_batch_size", "2",
            "--max_length", "256", "--lr", "1e-3", "--add_version", "false", "--train_dataloader_shuffle", "false",
            "--split_dataset_ratio", "0",
            *extra]


def _hf_logps(model, ids: list[int], labels: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    trained = torch.tensor(labels[1:]) != -100
    return float(logp[trained].sum())


def test_iteration_one_equals_transformers_with_trl_loss(model_dir, pairs, ref_mcore, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaswift.data.preference import build_preference_datasets
    from megaswift.training.preference_loss import PreferenceLossConfig, dpo_loss

    ref_hf, ref = ref_mcore
    save = tmp_path / "run"
    ok(run_megatron(_args(model_dir, pairs, ref, save, 1, "--beta", "0.5")))
    rows, _, _ = build_preference_datasets(data_args(dataset=[pairs], max_length=256, loss_scale="last_round"),
                                           AutoTokenizer.from_pretrained(model_dir))
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(ref_hf, dtype=torch.float32).eval()
    logps = {k: [] for k in ("pc", "pr", "rc", "rr")}
    for row in (rows[i] for i in range(8)):  # the first global batch (no shuffling)
        for model, tag in ((policy, "p"), (reference, "r")):
            logps[tag + "c"].append(_hf_logps(model, row["chosen_input_ids"], row["chosen_labels"]))
            logps[tag + "r"].append(_hf_logps(model, row["rejected_input_ids"], row["rejected_labels"]))
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in logps.items()}
    losses, chosen, rejected = dpo_loss(PreferenceLossConfig(beta=0.5), t["pc"], t["pr"], t["rc"], t["rr"])
    want = {"loss": losses.mean(), "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "logps/chosen": t["pc"].mean(),
            "logps/rejected": t["pr"].mean()}
    assert abs(float(want["rewards/margins"])) > 1e-3  # the reference really differs from the policy
    # rewards are beta x (policy - reference) log-prob differences of nearly equal sums: their fp32
    # error is relative to the log-probs they come from (rel 1e-5 of beta x (|policy| + |reference|))
    scale = {"rewards/chosen": 0.5 * float(t["pc"].abs().mean() + t["rc"].abs().mean()),
             "rewards/rejected": 0.5 * float(t["pr"].abs().mean() + t["rr"].abs().mean())}
    scale["rewards/margins"] = scale["rewards/chosen"] + scale["rewards/rejected"]
    for k, w in want.items():
        have = logged(save, k)[1]
        tol = RTOL * max(abs(float(w)), scale.get(k, 0.0)) + 1e-7
        assert abs(have - float(w)) <= tol, f"{k}: megatron {have} vs transformers+TRL {float(w)}"


@pytest.fixture(scope="module")
def dpo_reference(model_dir, pairs, ref_mcore, tmp_path_factory):
    save = tmp_path_factory.mktemp("dpo-one") / "run"
    ok(run_megatron(_args(model_dir, pairs, ref_mcore[1], save)))
    return {k: logged(save, k) for k in (*FIGURES, "grad_norm")}


@pytest.mark.parametrize("layout", tiered(sorted(LAYOUTS), {"pp2", "cp2", "dp2_distopt"}))
def test_dpo_loss_parity_with_one_process(layout, dpo_reference, model_dir, pairs, ref_mcore, tmp_path):
    nproc, flags = LAYOUTS[layout]
    save = tmp_path / "run"
    ok(run_megatron(_args(model_dir, pairs, ref_mcore[1], save, ITERS, *flags), nproc=nproc, timeout=900))
    for key, want in dpo_reference.items():
        have = logged(save, key)
        assert sorted(have) == sorted(want), (key, have)
        for it, w in want.items():
            assert abs(have[it] - w) <= RTOL * abs(w) + 1e-7, f"{key} at iteration {it}: {have[it]} vs {w}"
    assert logged(save)[ITERS] < logged(save)[1]


def test_lora_dpo_reference_is_the_base(model_dir, pairs, tmp_path):
    """LoRA DPO without --ref_load: the reference is the policy with its adapters off (no copy), so
    at iteration 1 (B = 0) policy and reference agree exactly: loss log 2, rewards 0."""
    save = tmp_path / "run"
    args = ["rlhf", "--model", str(model_dir), "--dataset", pairs, "--save", str(save), "--train_iters", "2",
            "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "256", "--add_version", "false",
            "--train_type", "lora", "--lora_dropout", "0", "--lr", "1e-3"]
    out = ok(run_megatron(args))
    assert "the policy with its LoRA adapters off" in out.stderr
    assert logged(save)[1] == pytest.approx(0.6931471805599453, rel=1e-6)
    assert logged(save, "rewards/margins")[1] == 0.0 and logged(save, "rewards/margins")[2] != 0.0
    # full-parameter DPO whose reference is the base weights: the same figures at iteration 1
    full = tmp_path / "full"
    full_args = list(args)
    for flag in ("--train_type", "--lora_dropout"):
        del full_args[full_args.index(flag):full_args.index(flag) + 2]
    full_args[full_args.index("--save") + 1] = str(full)
    full_args[full_args.index("--train_iters") + 1] = "1"
    ok(run_megatron(full_args))
    for key in FIGURES:
        assert logged(full, key)[1] == pytest.approx(logged(save, key)[1], rel=1e-6, abs=1e-9), key


def test_rlhf_bad_input(model_dir, pairs, tmp_path):
    proc = run_cli(["rlhf", "--model", str(model_dir), "--dataset", pairs, "--train_iters", "1",
                    "--loss_type", "sigmoidd", "--save", str(tmp_path / "x")])
    assert proc.returncode != 0 and "sigmoidd" in proc.stderr and "hinge" in proc.stderr
    proc = run_cli(["rlhf", "--model", str(model_dir), "--dataset", pairs, "--train_iters", "1",
                    "--f_divergence_type", "js_divergence", "--loss_type", "bco_pair", "--save", str(tmp_path / "x")])
    assert proc.returncode != 0 and "js_divergence" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_lora_dpo_from_an_sft_adapter_megatron_swift_recipe(model_dir, dataset, pairs, tmp_path):
    """`--adapter_load sft --ref_adapter_load sft --finetune true`: the policy starts from the SFT
    adapters and the reference is base + those adapters, so iteration 1 has policy == reference."""
    sft = tmp_path / "sft"
    ok(run_megatron(["sft", "--model", str(model_dir), "--dataset", dataset, "--save", str(sft), "--train_iters", "2",
                     "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "512", "--add_version",
                     "false", "--train_type", "lora", "--lora_dropout", "0", "--lr", "1e-2"]))
    save = tmp_path / "dpo"
    out = ok(run_megatron(["rlhf", "--model", str(model_dir), "--dataset", pairs, "--save", str(save),
                           "--train_iters", "2", "--global_batch_size", "4", "--micro_batch_size", "2",
                           "--max_length", "256", "--add_version", "false", "--train_type", "lora",
                           "--adapter_load", str(sft), "--ref_adapter_load", str(sft), "--finetune", "true",
                           "--lora_dropout", "0"]))
    assert f"adapters {sft}" in out.stderr and f"loaded adapters from {sft} (iteration 0)" in out.stderr
    assert logged(save)[1] == pytest.approx(0.6931471805599453, abs=1e-5)  # merged vs unmerged: float noise only
    assert abs(logged(save, "rewards/margins")[1]) < 1e-5
    assert logged(save, "logps/chosen")[1] != logged(save, "logps/chosen")[2]


def test_dpo_resume_after_sigkill_equals_uninterrupted(model_dir, pairs, ref_mcore, tmp_path):
    from test_training import _kill_after_checkpoint

    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    ok(run_megatron(_args(model_dir, pairs, ref_mcore[1], full, 4)))
    _kill_after_checkpoint(_args(model_dir, pairs, ref_mcore[1], killed, 4, "--save_interval", "2"), killed, 2, 1)
    args = _args(model_dir, pairs, ref_mcore[1], resumed, 4)
    args[args.index("--model"):args.index("--model") + 2] = ["--load", str(killed)]
    del args[args.index("--ref_load"):args.index("--ref_load") + 2]  # the run's own reference, from its args.json
    out = ok(run_megatron(args))
    assert f"resumed from {killed} at iteration 2" in out.stderr
    assert f"reference model: a frozen copy of {ref_mcore[1]}" in out.stderr
    for key in FIGURES:
        want, got = logged(full, key), logged(resumed, key)
        assert sorted(got) == [3, 4], (key, got)
        for it in got:
            assert got[it] == want[it], (key, it, got[it], want[it])
