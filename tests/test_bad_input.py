"""Bad input fails before any work with a message naming the problem, and leaves no output."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import run_cli, run_megatron


def _export(src, out, *extra, run=run_cli):
    """An export expected to fail; `run_megatron` for failures found during the conversion."""
    return run(["export", "--model", str(src), "--to_mcore", "true", "--save", str(out), *extra])


def _copy(hf, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(hf, dst)
    return dst, dst / "model.safetensors"


def _assert_failed_cleanly(proc, out, *phrases):
    assert proc.returncode != 0
    for p in phrases:
        assert p in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_unknown_tensor(tiny_model_dir, tmp_path):
    src, weights = _copy(tiny_model_dir("llama"), tmp_path)
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.surprise.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_failed_cleanly(_export(src, out, run=run_megatron), out, "model.layers.0.mlp.surprise.weight",
                           "no MCore counterpart")


def test_missing_tensor(tiny_model_dir, tmp_path):
    src, weights = _copy(tiny_model_dir("qwen3"), tmp_path)
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    _assert_failed_cleanly(_export(src, out, run=run_megatron), out, "model.layers.1.self_attn.k_norm.weight",
                           "missing")


def test_tp_does_not_divide_heads(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _export(tiny_model_dir("qwen3"), out, "--tensor_model_parallel_size", "3")
    _assert_failed_cleanly(proc, out, "--tensor_model_parallel_size 3 does not divide num_attention_heads 4")


def test_export_refuses_context_parallel(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _export(tiny_model_dir("llama"), out, "--context_parallel_size", "2")
    _assert_failed_cleanly(proc, out, "--context_parallel_size 2: conversion does not split sequences",
                           "export with --context_parallel_size 1")


def test_corrupt_safetensors(tiny_model_dir, tmp_path):
    src, weights = _copy(tiny_model_dir("mistral"), tmp_path)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    out = tmp_path / "out"
    _assert_failed_cleanly(_export(src, out), out, str(weights), "corrupt")


def test_output_exists(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _export(tiny_model_dir("llama"), out)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert list(out.iterdir()) == []


def test_load_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    proc = run_cli(["export", "--load", str(tmp_path / "empty"), "--to_hf", "true", "--save", str(out)])
    _assert_failed_cleanly(proc, out, "args.json is missing")


@pytest.mark.parametrize("content", ["{not json", '{"family": "llama"}'])
def test_damaged_args_json_names_the_file(tmp_path, content):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "args.json").write_text(content)
    out = tmp_path / "out"
    proc = run_cli(["export", "--load", str(ckpt), "--to_hf", "true", "--save", str(out)])
    _assert_failed_cleanly(proc, out, f"{ckpt / 'args.json'} is damaged")
    assert "Traceback" not in proc.stderr


def test_hub_id_offline(tmp_path):
    out = tmp_path / "out"
    proc = _export("HuggingFaceTB/SmolLM2-135M-Instruct", out)
    _assert_failed_cleanly(proc, out, "offline")
