"""The precision check catches a wrong conversion (it is not comparing a model with itself)."""

from __future__ import annotations

import torch

from megaswift.args.parallel import ParallelArgs
from megaswift.converters.convert import load_hf_weights
from megaswift.converters.hf_io import HFReader
from megaswift.model.builder import build_gpt_model
from megaswift.model.config import transformer_config
from megaswift.model.hf import HFModel, load_hf_config
from megaswift.precision import compare, sample_token_ids
from megaswift.runtime.distributed import destroy_distributed, init_distributed


def test_perturbed_weight_fails_check(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen3")
    parallel = ParallelArgs()
    model = HFModel.from_config(load_hf_config(src), 128, 1)
    init_distributed(parallel)
    try:
        config = transformer_config(model.config, model.family, parallel.sizes(), torch.float32,
                                    perform_initialization=False)
        chunk = build_gpt_model(model.config, config, padded_vocab=model.dims.padded_vocab_size)
        load_hf_weights([chunk], model.family, model.config, HFReader(src), model.dims)
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        samples = sample_token_ids(None, model.dims.vocab_size)
        good = compare(chunk, config, hf, samples, model.dims.vocab_size)
        assert all(r.ok and r.max_abs_diff < 1e-4 for r in good), good
        with torch.no_grad():  # what a k/v swap in one layer's q_norm would look like: small
            chunk.decoder.layers[1].self_attention.q_layernorm.weight.mul_(1.01)
        bad = compare(chunk, config, hf, samples, model.dims.vocab_size)
        assert all(r.max_abs_diff > 1e-3 for r in bad), bad
        assert not any(r.ok for r in bad)
    finally:
        destroy_distributed()
