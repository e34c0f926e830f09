"""HF -> MCore -> HF is bitwise exact, and MCore logits match transformers, for every dense family.

Real `megatron export` runs: in one process, and under torchrun with 2 gloo ranks at TP=2 and PP=2
(PP=2 export resharding a TP=2 checkpoint as well).
"""

from __future__ import annotations

import pytest

from conftest import FAMILIES, assert_bitwise_equal, precision_figures, read_safetensors_dir, run_megatron

TOL = 1e-4


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _assert_precise(output: str):
    figures = precision_figures(output)
    assert set(figures) == {"padded", "packed"}, output[-3000:]
    for layout, (max_diff, agree) in figures.items():
        assert max_diff <= TOL, f"{layout}: max |logit diff| {max_diff}"
        assert agree == 1.0, f"{layout}: argmax agreement {agree}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_tp1(family, tiny_model_dir, tmp_path):
    hf = tiny_model_dir(family)
    out = _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save",
                            str(tmp_path / "mc"), "--test_convert_precision", "true"]))
    _assert_precise(out)
    _ok(run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true",
                      "--save", str(tmp_path / "hf")]))
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_round_trip_tp2_then_pp2(family, tiny_model_dir, tmp_path):
    """TP=2 write (+ logits at TP=2), PP=2 read of that checkpoint (+ logits at PP=2), bitwise."""
    hf = tiny_model_dir(family)
    out = _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save",
                            str(tmp_path / "mc"), "--tensor_model_parallel_size", "2",
                            "--test_convert_precision", "true"], nproc=2))
    _assert_precise(out)
    out = _ok(run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true", "--save",
                            str(tmp_path / "hf"), "--pipeline_model_parallel_size", "2",
                            "--max_shard_size", "50KB", "--test_convert_precision", "true"], nproc=2))
    _assert_precise(out)
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 2
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


def test_round_trip_pp2_write_tp2_read(tiny_model_dir, tmp_path):
    hf = tiny_model_dir("llama")  # tied embeddings: output layer lives on the last stage
    _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save",
                      str(tmp_path / "mc"), "--pipeline_model_parallel_size", "2"], nproc=2))
    _ok(run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true", "--save",
                      str(tmp_path / "hf"), "--tensor_model_parallel_size", "2"], nproc=2))
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))
