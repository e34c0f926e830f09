"""config.json's sliding_window: runs that could exceed it are refused before any work."""

from __future__ import annotations

import json

import transformers

from conftest import logged, run_megatron
from megaswift.assets import fetch_llamafactory_data, fetch_smollm2
from megaswift.model.config import sliding_window
from tiny_models import make_tiny_model


def test_which_configs_have_a_window():
    assert sliding_window(transformers.MistralConfig(sliding_window=4096)) == 4096
    assert sliding_window(transformers.MistralConfig(sliding_window=None)) is None
    # Qwen2 ships a sliding_window value with use_sliding_window false: no window
    assert sliding_window(transformers.Qwen2Config(sliding_window=4096, use_sliding_window=False)) is None


def test_sft_refuses_sequences_longer_than_the_window(tmp_path):
    model = make_tiny_model("mistral", tmp_path / "m", tokenizer_dir=fetch_smollm2())
    cfg = json.loads((model / "config.json").read_text())
    cfg["sliding_window"] = 64
    (model / "config.json").write_text(json.dumps(cfg))
    data = str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#8"

    def sft(save, *extra):
        return run_megatron(["sft", "--model", str(model), "--dataset", data, "--save", str(save),
                             "--train_iters", "1", "--global_batch_size", "2", "--micro_batch_size", "1",
                             "--add_version", "false", *extra])

    for extra in (["--max_length", "512"], []):
        proc = sft(tmp_path / "refused", *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "sliding_window 64" in proc.stderr and "--max_length 64 or less" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "refused").exists()
    # within the window full causal attention is the same attention: it trains
    proc = sft(tmp_path / "ok", "--max_length", "64", "--truncation_strategy", "left")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert logged(tmp_path / "ok")[1] > 0
