"""DeepSeek-V2 / V3 (multi-latent attention, fine-grained MoE): HF -> MCore -> HF is bitwise exact
and MCore logits match transformers at EP=2 and TP=2 (TP=1: test_convert.py), megatron-core's router
chooses and weighs experts as transformers' does, features without an exact equivalent are refused,
multi-token-prediction layers are skipped with a count, and the MLA CPU adaptations are still needed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV2Config, DeepseekV3Config

from conftest import assert_bitwise_equal, read_safetensors_dir, run_megatron
from megaswift.converters import family_for
from megaswift.converters.sharding import shard, unshard
from test_convert import _assert_precise, _ok
from test_cpu_compat import exercises, world  # noqa: F401  (the registry's marker and one-rank fixture)

FAMILIES = ["deepseek_v3", "deepseek_v2"]


# -- conversion through the real CLI ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("write, read", [("--expert_model_parallel_size", "--tensor_model_parallel_size"),
                                         ("--tensor_model_parallel_size", "--expert_model_parallel_size")],
                         ids=["ep2-then-tp2", "tp2-then-ep2"])
def test_round_trip_across_layouts(family, write, read, tiny_model_dir, tmp_path):
    """Written at one 2-rank layout (+ logits there), read back at the other (+ logits), bitwise."""
    hf = tiny_model_dir(family)
    out = _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(tmp_path / "mc"),
                            write, "2", "--test_convert_precision", "true"], nproc=2))
    _assert_precise(out)
    out = _ok(run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true", "--save",
                            str(tmp_path / "hf"), read, "2", "--test_convert_precision", "true"], nproc=2))
    _assert_precise(out)
    assert_bitwise_equal(read_safetensors_dir(hf), read_safetensors_dir(tmp_path / "hf"))


def test_bf16_checkpoint_keeps_its_float32_routing_bias(tmp_path):
    """DeepSeek-V3 ships e_score_correction_bias in float32 inside bf16 weights: it comes back
    float32 and bitwise, while the rest stays bf16."""
    from safetensors.torch import load_file

    from tiny_models import make_tiny_model

    hf = make_tiny_model("deepseek_v3", tmp_path / "hf", dtype=torch.bfloat16)
    weights = load_file(hf / "model.safetensors")
    for k in [k for k in weights if k.endswith("e_score_correction_bias")]:
        weights[k] = torch.randn(weights[k].shape, dtype=torch.float32)
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(tmp_path / "mc")]))
    _ok(run_megatron(["export", "--load", str(tmp_path / "mc"), "--to_hf", "true", "--save", str(tmp_path / "out")]))
    back = read_safetensors_dir(tmp_path / "out")
    assert_bitwise_equal(weights, back)
    assert {str(t.dtype) for k, t in back.items() if k.endswith("e_score_correction_bias")} == {"torch.float32"}
    assert back["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_multi_token_prediction_layers_are_skipped_with_a_count(tiny_model_dir, tmp_path):
    """A V3 checkpoint's MTP layer (numbered num_hidden_layers) is logged and left out; the rest converts."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_model_dir("deepseek_v3"), hf)
    config = json.loads((hf / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    mtp = f"model.layers.{config['num_hidden_layers']}."
    save_file({mtp + "enorm.weight": torch.ones(64), mtp + "eh_proj.weight": torch.zeros(64, 128)},
              str(hf / "mtp.safetensors"))
    out = _ok(run_megatron(["export", "--model", str(hf), "--to_mcore", "true", "--save", str(tmp_path / "mc")]))
    assert "skipped 2 HF tensor(s) of 1 multi-token-prediction layer(s)" in out


# -- the mappings, pure torch -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_mapping_round_trips_exactly_at_every_size(family, tiny_model_dir):
    """to_hf(unshard(shard(to_mcore(x)))) == x for each mapping, on the tiny model's real tensors."""
    from megaswift.model.hf import HFModel, load_hf_config

    hf_dir = tiny_model_dir(family)
    cfg = load_hf_config(hf_dir)
    model = HFModel.from_config(cfg, 128, 1)
    tensors = read_safetensors_dir(hf_dir)
    seen = set()
    for m in model.family.mappings(cfg):
        layers = range(cfg.num_hidden_layers) if "*" in m.mcore else [None]
        experts = range(cfg.n_routed_experts) if "{E}" in m.mcore else [None]
        for layer in layers:
            for expert in experts:
                names = m.hf_names(layer, expert)
                if not all(n in tensors for n in names.values()):
                    continue  # a dense layer's MoE names, or the other expert naming
                full = m.to_mcore({r: tensors[n] for r, n in names.items()}, model.dims)
                for size in (1, 2, 4):
                    parts = [shard(full, m.shard, r, size, m.axis) for r in range(size)]
                    back = m.to_hf(unshard(parts, m.shard), model.dims)
                    assert all(torch.equal(back[r], tensors[n]) for r, n in names.items()), (m.mcore, size)
                seen.update(names.values())
    assert seen == set(tensors)


# -- routing: megatron-core's router against transformers' ----------------------------------------------

def _megatron_routing(fields: dict, logits: torch.Tensor):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    return topk_routing_with_score_function(
        logits, fields["moe_router_topk"], use_pre_softmax=fields["moe_router_pre_softmax"],
        num_groups=fields["moe_router_num_groups"], group_topk=fields["moe_router_group_topk"],
        scaling_factor=fields["moe_router_topk_scaling_factor"],
        score_function=fields["moe_router_score_function"],
        expert_bias=fields.get("_expert_bias"))


def _assert_same_routing(router, fields: dict, hidden: torch.Tensor, expert_bias=None):
    logits, weights, indices = router(hidden)
    dense = torch.zeros_like(logits).scatter(1, indices, weights)
    probs, routing_map = _megatron_routing({**fields, "_expert_bias": expert_bias}, logits)
    assert torch.equal(routing_map, dense > 0)
    torch.testing.assert_close(probs, dense, rtol=1e-6, atol=1e-7)


MLA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=8, num_hidden_layers=2,
           first_k_dense_replace=1, vocab_size=64)


@pytest.mark.parametrize("groups, group_topk, topk", [(1, 1, 4), (4, 2, 4), (8, 4, 8)])
def test_v3_router_matches_transformers(groups, group_topk, topk):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=topk, n_group=groups,
                           topk_group=group_topk, routed_scaling_factor=2.5, norm_topk_prob=True)
    fields = family_for(cfg).transformer_config(cfg)
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(std=0.5)
        router.e_score_correction_bias.normal_(std=0.1)
    _assert_same_routing(router, fields, torch.randn(500, 32), router.e_score_correction_bias)


@pytest.mark.parametrize("method, groups, group_topk", [("greedy", None, None), ("group_limited_greedy", 4, 2)])
def test_v2_router_matches_transformers(method, groups, group_topk):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(**MLA, n_routed_experts=16, num_experts_per_tok=2, topk_method=method, n_group=groups,
                           topk_group=group_topk, routed_scaling_factor=1.5, n_shared_experts=2)
    fields = family_for(cfg).transformer_config(cfg)
    torch.manual_seed(0)
    router = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(std=0.5)
    _assert_same_routing(router, fields, torch.randn(500, 32))


# -- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, match", [
    (DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=8, n_group=8, topk_group=2),
     "top-2 experts"),
    (DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=4, norm_topk_prob=False), "renormalises"),
    (DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=4, rope_interleave=False), "rope_interleave"),
    (DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=4, attention_bias=True), "attention_bias"),
    (DeepseekV3Config(**MLA, n_routed_experts=16, num_experts_per_tok=4,
                      rope_scaling={"rope_type": "linear", "factor": 2.0}), "default and yarn"),
    (DeepseekV2Config(**MLA, n_routed_experts=16, num_experts_per_tok=6, topk_method="group_limited_greedy",
                      n_group=8, topk_group=3), "best expert"),
    (DeepseekV2Config(**MLA, n_routed_experts=16, num_experts_per_tok=2, norm_topk_prob=True), "ambiguous"),
], ids=["v3-group-score", "v3-no-renorm", "v3-rope-layout", "v3-bias", "v3-linear-rope", "v2-group-score",
        "v2-norm-topk"])
def test_inexact_features_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        family_for(config)


# -- the CPU adaptations multi-latent attention needs (cpu_compat) --------------------------------------
# (test_cpu_compat.test_every_adaptation_has_a_behaviour_test counts these too)

@exercises("patch_mla_yarn_device")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adaptations are inert with CUDA")
def test_mla_yarn_rope_device(world):
    """YarnRotaryEmbedding, as MLA builds it (no use_cpu_initialization), asks for a CUDA device."""
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding

    from megaswift.runtime import cpu_compat

    with cpu_compat.suspended("patch_mla_yarn_device"), pytest.raises(AssertionError, match="CUDA"):
        YarnRotaryEmbedding(8, scaling_factor=4.0, original_max_position_embeddings=64)
    emb, _ = YarnRotaryEmbedding(8, scaling_factor=4.0, original_max_position_embeddings=64)(16)
    assert emb.shape == (16, 1, 1, 8) and emb.device.type == "cpu"


@exercises("patch_mla_te_check")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adaptations are inert with CUDA")
def test_mla_te_check(world):
    """MLASelfAttention's fp8 check calls isinstance on TE's mock TELinear when TE is absent."""
    from megatron.core.transformer.enums import AttnMaskType

    from megaswift.model.config import ParallelSizes, transformer_config
    from megaswift.model.spec import _mla_attention_spec
    from megaswift.runtime import cpu_compat

    cfg = DeepseekV3Config(**MLA, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    config = transformer_config(cfg, family_for(cfg), ParallelSizes(), torch.float32, perform_initialization=False)
    spec = _mla_attention_spec(qk_layernorm=True)

    def build():
        return spec.module(config=config, submodules=spec.submodules, layer_number=1,
                           attn_mask_type=AttnMaskType.causal)

    with cpu_compat.suspended("patch_mla_te_check"), pytest.raises(TypeError, match="isinstance"):
        build()
    out, _ = build()(torch.randn(5, 2, 32), attention_mask=None)
    assert out.shape == (5, 2, 32)
