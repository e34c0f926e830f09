"""Pure-torch properties of every mapping and shard kind: exact both ways, at every TP, expert-TP
and EP size; the name placeholders, the canonical-name step and the family config hook."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2MoeConfig, Qwen3Config

from megaswift.converters import FAMILIES
from megaswift.converters.convert import export_hf_tensors, load_hf_weights, targets
from megaswift.converters.family import HF_LAYER, LAYER, Family
from megaswift.converters.hf_io import HFReader
from megaswift.converters.mappings import QKV, GatedMLP, ModelDims, Rename, VocabRows
from megaswift.converters.names import EXPERT, Canonical, canonical, compile_pattern, fill
from megaswift.converters.sharding import Axis, Placement, Shard, expert_owner, shard, unshard
from megaswift.model.config import ParallelSizes, transformer_config

G = torch.Generator().manual_seed(0)
# heads 12, 4 query groups (GQA 3:1), head_dim 8, hidden 32, vocab 250 padded to 256
DIMS = ModelDims(num_attention_heads=12, num_query_groups=4, head_dim=8, vocab_size=250, padded_vocab_size=256)
HIDDEN, FFN = 32, 48
EXPERTS, MOE_FFN = 8, 16


def _moe_mlp(grouped: bool):
    """A Qwen2-MoE-style layer MLP: router, routed experts (SequentialMLP or TEGroupedMLP names)
    and a shared expert, declared as a family would."""
    def mc(linear: str) -> str:
        if grouped:
            return LAYER + "mlp.experts." + linear + ".weight" + EXPERT
        return LAYER + "mlp.experts.local_experts." + EXPERT + "." + linear + ".weight"

    hf = HF_LAYER + "mlp.experts." + EXPERT + "."
    return lambda cfg: [
        Rename(LAYER + "pre_mlp_layernorm.weight", hf=HF_LAYER + "post_attention_layernorm.weight"),
        Rename(LAYER + "mlp.router.weight", hf=HF_LAYER + "mlp.gate.weight"),
        GatedMLP(mc("linear_fc1"), gate=hf + "gate_proj.weight", up=hf + "up_proj.weight",
                 axis=Axis.EXPERT_TP),
        Rename(mc("linear_fc2"), hf=hf + "down_proj.weight", shard=Shard.ROW, axis=Axis.EXPERT_TP),
        GatedMLP(LAYER + "mlp.shared_experts.linear_fc1.weight",
                 gate=HF_LAYER + "mlp.shared_expert.gate_proj.weight",
                 up=HF_LAYER + "mlp.shared_expert.up_proj.weight"),
        Rename(LAYER + "mlp.shared_experts.linear_fc2.weight",
               hf=HF_LAYER + "mlp.shared_expert.down_proj.weight", shard=Shard.ROW),
    ]


def _moe_config(cfg) -> dict:
    return {"num_moe_experts": cfg.num_experts, "moe_router_topk": cfg.num_experts_per_tok,
            "moe_ffn_hidden_size": cfg.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}


TOY_MOE = {grouped: Family(name="toy_moe", model_types=("toy_moe",), architecture="ToyMoeForCausalLM",
                           qk_layernorm=True, mlp=_moe_mlp(grouped), transformer_config=_moe_config)
           for grouped in (False, True)}


def _rand(*shape):
    return torch.randn(*shape, generator=G)


@pytest.mark.parametrize("kind", list(Shard))
@pytest.mark.parametrize("size", [1, 2, 4])
def test_unshard_inverts_shard(kind, size):
    full = _rand(2 * 4 * 3, 4 * 5)
    parts = [shard(full, kind, r, size) for r in range(size)]
    assert torch.equal(unshard(parts, kind), full)
    if kind is not Shard.REPLICATED and size > 1:
        assert all(p.numel() * size == full.numel() for p in parts)


def test_shard_refuses_uneven_split():
    with pytest.raises(ValueError, match="--tensor_model_parallel_size 3"):
        shard(_rand(4, 4), Shard.COLUMN, 0, 3)
    with pytest.raises(ValueError, match="--expert_tensor_parallel_size 3"):
        shard(_rand(4, 4), Shard.ROW, 0, 3, Axis.EXPERT_TP)


def test_placement_gives_each_axis_its_own_group():
    p = Placement(tp=(1, 4), etp=(0, 2), ep=(3, 4))
    assert p.on(Axis.TP) == (1, 4) and p.on(Axis.EXPERT_TP) == (0, 2)


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_expert_index_local_to_global_and_back(ep):
    """Megatron's layout: EP rank r holds experts r*n_local .. (r+1)*n_local-1, each exactly once."""
    n_local = EXPERTS // ep
    seen = []
    for rank in range(ep):
        p = Placement(ep=(rank, ep))
        for local in range(n_local):
            g = p.global_expert(local, EXPERTS)
            assert g == rank * n_local + local and expert_owner(g, EXPERTS, ep) == (rank, local)
            seen.append(g)
    assert sorted(seen) == list(range(EXPERTS))


def test_expert_parallel_must_divide_experts():
    with pytest.raises(ValueError, match="--expert_model_parallel_size 3"):
        Placement(ep=(0, 3)).global_expert(0, EXPERTS)


@pytest.mark.parametrize("pattern", ["decoder.layers.*.mlp.experts.local_experts.{E}.linear_fc1.weight",
                                     "decoder.layers.*.mlp.experts.linear_fc1.weight{E}",
                                     "model.layers.*.mlp.experts.{E}.gate_proj.weight",
                                     "decoder.layers.*.mlp.router.weight", "output_layer.weight"])
def test_placeholders_fill_and_match_both_indices(pattern):
    name = fill(pattern, layer=11, expert=7)
    assert "*" not in name and "{E}" not in name
    found = compile_pattern(pattern).match(name).groupdict()
    assert found.get("layer") == ("11" if "*" in pattern else None)
    assert found.get("expert") == ("7" if "{E}" in pattern else None)
    assert not compile_pattern(pattern).match(name + "x")
    if "{E}" in pattern:
        with pytest.raises(ValueError, match="needs an index for"):
            fill(pattern, layer=11)


@pytest.mark.parametrize("name, expected", [
    ("decoder.layers.0.self_attention.linear_qkv.weight",
     Canonical("decoder.layers.0.self_attention.linear_qkv.weight")),
    ("decoder.layers.0.self_attention.linear_qkv.base_layer.weight",
     Canonical("decoder.layers.0.self_attention.linear_qkv.weight")),
    ("decoder.layers.0.self_attention.linear_qkv.base_layer.layer_norm_weight",
     Canonical("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")),
    ("decoder.layers.0.self_attention.linear_qkv.lora_A.weight",
     Canonical("decoder.layers.0.self_attention.linear_qkv.weight", adapter="lora_A.weight")),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.lora_B.default.weight",
     Canonical("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight",
               adapter="lora_B.default.weight")),
    ("embedding.word_embeddings.base_layer.weight", Canonical("embedding.word_embeddings.weight")),
])
def test_canonical_name_keeps_the_base_name(name, expected):
    assert canonical(name) == expected


def test_glu_rank_holds_its_gate_and_up_rows():
    gate, up = _rand(FFN, HIDDEN), _rand(FFN, HIDDEN)
    full = GatedMLP("fc1", gate="g", up="u").to_mcore({"gate": gate, "up": up}, DIMS)
    for r in range(4):
        rows = slice(r * FFN // 4, (r + 1) * FFN // 4)
        assert torch.equal(shard(full, Shard.GLU, r, 4), torch.cat([gate[rows], up[rows]]))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_qkv_shard_holds_whole_query_groups(size):
    """TP rank r's rows of the fused QKV are exactly its query groups' q, k and v heads."""
    q, k, v = _rand(12 * 8, HIDDEN), _rand(4 * 8, HIDDEN), _rand(4 * 8, HIDDEN)
    m = QKV("qkv", q="q", k="k", v="v")
    full = m.to_mcore({"q": q, "k": k, "v": v}, DIMS)
    per_rank = 4 // size
    for r in range(size):
        local = ModelDims(12 // size, per_rank, 8, 250, 256)
        groups = slice(r * per_rank * 8, (r + 1) * per_rank * 8)
        qs = slice(r * per_rank * 3 * 8, (r + 1) * per_rank * 3 * 8)
        got = m.to_hf(shard(full, Shard.COLUMN, r, size), local)
        assert torch.equal(got["q"], q[qs]) and torch.equal(got["k"], k[groups]) and torch.equal(got["v"], v[groups])


def test_vocab_rows_pad_and_trim():
    emb = _rand(250, HIDDEN)
    m = VocabRows("emb", hf="e")
    padded = m.to_mcore({"hf": emb}, DIMS)
    assert padded.shape == (256, HIDDEN) and not padded[250:].any()
    assert torch.equal(m.to_hf(padded, DIMS)["hf"], emb)
    with pytest.raises(ValueError, match="vocab_size is 250"):
        m.to_mcore({"hf": emb[:-1]}, DIMS)


def _hf_shape(name: str) -> tuple[int, ...]:
    """A plausible shape for an HF tensor of the decoder (DIMS, HIDDEN, FFN; MOE_FFN in experts)."""
    q, kv = DIMS.num_attention_heads * DIMS.head_dim, DIMS.num_query_groups * DIMS.head_dim
    ffn = MOE_FFN if ".experts." in name else FFN
    table = {"embed_tokens": (250, HIDDEN), "lm_head": (250, HIDDEN), "q_proj.weight": (q, HIDDEN),
             "k_proj.weight": (kv, HIDDEN), "v_proj.weight": (kv, HIDDEN), "q_proj.bias": (q,),
             "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj": (HIDDEN, q), "gate_proj": (ffn, HIDDEN),
             "up_proj": (ffn, HIDDEN), "down_proj": (HIDDEN, ffn), "q_norm": (DIMS.head_dim,),
             "k_norm": (DIMS.head_dim,), "layernorm": (HIDDEN,), "model.norm": (HIDDEN,),
             "mlp.gate.weight": (EXPERTS, HIDDEN), "block_sparse_moe.gate.weight": (EXPERTS, HIDDEN),
             "shared_expert_gate": (1, HIDDEN), ".w1.": (ffn, HIDDEN), ".w3.": (ffn, HIDDEN),
             ".w2.": (HIDDEN, ffn)}
    return next(shape for key, shape in table.items() if key in name)


def _moe_hf_config(tied: bool = False):
    return Qwen2MoeConfig(tie_word_embeddings=tied, num_experts=EXPERTS, num_experts_per_tok=2,
                          moe_intermediate_size=MOE_FFN, shared_expert_intermediate_size=FFN,
                          hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=12,
                          num_key_value_heads=4, head_dim=8, num_hidden_layers=4, vocab_size=250)


CASES = [(f, Qwen3Config(tie_word_embeddings=t, attention_bias=f.default_qkv_bias))
         for f in FAMILIES if f.attention is None for t in (False, True)]  # MLA families: test_deepseek.py
CASES += [(TOY_MOE[grouped], _moe_hf_config(t)) for grouped in (False, True) for t in (False, True)]
IDS = [f"{f.name}{'-grouped' if f is TOY_MOE[True] else ''}{'-tied' if c.tie_word_embeddings else ''}"
       for f, c in CASES]


@pytest.mark.parametrize("family, cfg", CASES, ids=IDS)
def test_every_mapping_round_trips_exactly_at_every_size(family, cfg):
    """to_hf(unshard(shard(to_mcore(x)))) == x for each mapping of the family (dense and expert
    axes), split over 1, 2 and 4 ranks."""
    for m in family.mappings(cfg):
        hf = {role: _rand(*_hf_shape(name)) for role, name in m.hf_names(3, 5).items()}
        full = m.to_mcore(hf, DIMS)
        for size in (1, 2, 4):
            parts = [shard(full, m.shard, r, size, m.axis) for r in range(size)]
            back = m.to_hf(unshard(parts, m.shard), DIMS)
            assert back.keys() == hf.keys(), m.mcore
            for role in hf:
                assert torch.equal(back[role], hf[role]), (family.name, m.mcore, role, size)


def _hf_tensors(family: Family, cfg, layers: int) -> dict[str, torch.Tensor]:
    """Every HF tensor of a `layers`-layer model of `family` (random)."""
    out = {}
    for m in family.mappings(cfg):
        for layer in range(layers) if "*" in m.mcore else [None]:
            for expert in range(EXPERTS) if "{E}" in m.mcore else [None]:
                out.update({n: _rand(*_hf_shape(n)) for n in m.hf_names(layer, expert).values()})
    return out


def _chunk(family: Family, cfg, layer_numbers: list[int], n_local: int, lora: bool) -> torch.nn.Module:
    """A module tree with megatron-core's parameter names (local layer and expert numbers), as
    `targets` walks it: `decoder.layers[i].layer_number`, `config.num_moe_experts`. With `lora`,
    each linear_qkv is wrapped peft-style (`base_layer` plus `lora_A` / `lora_B`)."""
    root = torch.nn.Module()
    root.config = SimpleNamespace(num_moe_experts=EXPERTS)  # what GPTModel.config holds, as far as read
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList(torch.nn.Module() for _ in layer_numbers)
    for layer, number in zip(root.decoder.layers, layer_numbers):
        layer.layer_number = number
    names = {fill(m.mcore, layer, expert) for m in family.mappings(cfg)
             for layer in (range(len(layer_numbers)) if "*" in m.mcore else [None])
             for expert in (range(n_local) if "{E}" in m.mcore else [None])}
    if lora:
        qkv = [n for n in names if n.endswith("linear_qkv.weight")]
        names = (names - set(qkv)) | {n.replace(".weight", f".{part}.weight")
                                      for n in qkv for part in ("base_layer", "lora_A", "lora_B")}
    for name in sorted(names):
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(0)))
    return root


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_targets_give_each_expert_to_one_ep_rank(grouped, ep):
    """Across EP ranks (chunks holding global layers 2 and 3), the routed experts' HF tensors are
    read exactly once and the rest on every rank; LoRA-wrapped weights keep their base mapping."""
    family, cfg = TOY_MOE[grouped], _moe_hf_config()
    every = set(_hf_tensors(family, cfg, layers=4))
    per_rank = []
    for rank in range(ep):
        chunk = _chunk(family, cfg, [3, 4], EXPERTS // ep, lora=True)
        got = targets([chunk], family, cfg, Placement(ep=(rank, ep)))
        adapters = {t.mcore_name: t.adapter for t in got if t.adapter}
        assert adapters.keys() == {f"decoder.layers.{n}.self_attention.linear_qkv.weight" for n in (2, 3)}
        assert all(t.layer in (2, 3) for t in got if t.layer is not None)
        per_rank.append([n for t in got if not t.adapter for n in t.hf_names().values()])
    expert_names = [n for names in per_rank for n in names if ".experts." in n]
    assert len(expert_names) == len(set(expert_names))
    assert {n for names in per_rank for n in names} == {n for n in every if ".layers.0." not in n
                                                        and ".layers.1." not in n}


@pytest.mark.parametrize("family, cfg", CASES, ids=IDS)
def test_load_then_export_is_exact_through_the_engine(family, cfg, tmp_path):
    """The real engine on one rank: HF -> chunk -> HF is bitwise, adapter parameters untouched."""
    hf = _hf_tensors(family, cfg, layers=2)
    save_file(hf, str(tmp_path / "model.safetensors"))
    chunk = _chunk(family, cfg, [1, 2], EXPERTS, lora=True)
    for t in targets([chunk], family, cfg, Placement()):  # size each base parameter as the model would
        if not t.adapter:
            t.param.data = torch.zeros(t.mapping.to_mcore({r: hf[n] for r, n in t.hf_names().items()},
                                                          DIMS).shape)
    load_hf_weights([chunk], family, cfg, HFReader(tmp_path), DIMS, placement=Placement())
    back = dict(export_hf_tensors([chunk], family, cfg, DIMS, placement=Placement()))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    lora = [p for n, p in chunk.named_parameters() if ".lora_" in n]
    assert lora and all(p.numel() == 0 for p in lora)


def test_family_config_hook_reaches_transformer_config():
    cfg = _moe_hf_config()
    config = transformer_config(cfg, TOY_MOE[False], ParallelSizes(), torch.float32,
                                perform_initialization=False, moe_router_topk=4)
    assert (config.num_moe_experts, config.moe_ffn_hidden_size) == (EXPERTS, MOE_FFN)
    assert config.moe_shared_expert_intermediate_size == FFN and config.qk_layernorm
    assert config.moe_router_topk == 4  # the caller's overrides win over the family's fields
    by_name = {f.name: f for f in FAMILIES}
    qwen2 = transformer_config(Qwen3Config(attention_bias=True), by_name["qwen2"],
                               ParallelSizes(tp=2, ep=1), torch.float32)
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm and qwen2.tensor_model_parallel_size == 2
