"""The real SmolLM2-135M-Instruct (bf16, tied embeddings): precision check passes, round trip is bitwise."""

from __future__ import annotations

from conftest import assert_bitwise_equal, precision_figures, read_safetensors_dir, run_megatron
from megaswift.assets import fetch_smollm2


def test_smollm2_export_round_trip(tmp_path):
    hf = fetch_smollm2()
    proc = run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save",
                         str(tmp_path / "mc"), "--test_convert_precision", "true"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = precision_figures(proc.stderr)
    assert set(figures) == {"padded", "packed"}
    assert all(d <= 1e-3 and agree == 1.0 for d, agree in figures.values()), figures
    proc = run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true",
                         "--save", str(tmp_path / "hf"), "--max_shard_size", "100MB"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) == 3
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))
