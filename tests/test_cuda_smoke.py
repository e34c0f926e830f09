"""On a CUDA machine: conversion and 3 bf16 training steps at TP=1 through the real CLI.

Skipped where there is no GPU (CI); run on a lent GPU with `bash scripts/test.sh tests/test_cuda_smoke.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_megatron
from megaswift.assets import fetch_llamafactory_data, fetch_smollm2
from tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_convert_and_train_three_bf16_steps_on_cuda(tmp_path):
    model = make_tiny_model("llama", tmp_path / "hf", tokenizer_dir=fetch_smollm2())
    mcore = tmp_path / "mcore"
    out = run_megatron(["export", "--model", str(model), "--to_mcore", "true", "--save", str(mcore),
                        "--test_convert_precision", "true"])
    assert out.returncode == 0, out.stderr[-3000:]
    save = tmp_path / "run"
    out = run_megatron(["sft", "--load", str(mcore), "--dataset",
                        str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#24", "--save", str(save),
                        "--bf16", "true", "--train_iters", "3", "--global_batch_size", "8",
                        "--micro_batch_size", "2", "--lr", "1e-4", "--max_length", "512",
                        "--add_version", "false", "--transformer_impl", "local"])
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [rec["loss"] for rec in map(json.loads, (save / "logging.jsonl").read_text().splitlines()) if "loss" in rec]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
