"""The one runtime decision: flags and hardware -> device, backend, layer spec, attention kernel."""

from __future__ import annotations

import json

import pytest

from conftest import logged, run_megatron
from megaswift.assets import fetch_llamafactory_data
from megaswift.runtime.context import resolve


def test_defaults_fall_back_on_cpu_with_one_line_each(monkeypatch):
    monkeypatch.delenv("MEGASWIFT_TRANSFORMER_IMPL", raising=False)
    monkeypatch.delenv("MEGASWIFT_ATTENTION", raising=False)
    rt = resolve()  # the seed's defaults: transformer_engine, flash
    assert (rt.device_type, rt.backend, rt.transformer_impl, rt.attention_kernel) == ("cpu", "gloo", "local", "fused")
    assert len(rt.notes) == 2 and "--transformer_impl transformer_engine: no CUDA" in rt.notes[0]
    assert "--attention_backend flash" in rt.notes[1]
    assert resolve("local", "unfused").attention_kernel == "reference"
    assert resolve("local", "auto").notes == ()


def test_environment_overrides_and_bad_values(monkeypatch):
    monkeypatch.setenv("MEGASWIFT_ATTENTION", "reference")
    assert resolve("local", "flash").attention_kernel == "reference"
    monkeypatch.setenv("MEGASWIFT_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="MEGASWIFT_ATTENTION"):
        resolve()
    monkeypatch.delenv("MEGASWIFT_ATTENTION")
    with pytest.raises(ValueError, match="--attention_backend 'sdpa'"):
        resolve("local", "sdpa")


def _first_loss(save):
    return logged(save)[1]


def test_attention_backend_through_sft(model_dir, tmp_path):
    """`--attention_backend flash` (Megatron-SWIFT's scripts) falls back with one logged line;
    `unfused` runs the plain-torch reference kernel; both give the same loss."""
    data = str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#8"
    runs = {}
    for backend in ("flash", "unfused"):
        save = tmp_path / backend
        proc = run_megatron(["sft", "--model", str(model_dir), "--dataset", data, "--save", str(save),
                             "--train_iters", "1", "--global_batch_size", "4", "--micro_batch_size", "2",
                             "--max_length", "512", "--add_version", "false", "--attention_backend", backend])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[backend] = (_first_loss(save), proc.stderr)
        assert json.loads((save / "args.json").read_text())["runtime"]["attention_backend"] == backend
    assert runs["flash"][1].count("--attention_backend flash: needs TransformerEngine") == 1
    assert "--attention_backend" not in runs["unfused"][1]
    assert abs(runs["flash"][0] - runs["unfused"][0]) / runs["flash"][0] < 1e-5
