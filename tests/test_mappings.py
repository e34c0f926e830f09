"""Pure-torch properties of every mapping and shard kind: exact both ways, at every TP size."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

from megaswift.converters import FAMILIES
from megaswift.converters.mappings import QKV, GatedMLP, ModelDims, VocabRows
from megaswift.converters.sharding import Shard, shard, unshard

G = torch.Generator().manual_seed(0)
# heads 12, 4 query groups (GQA 3:1), head_dim 8, hidden 32, vocab 250 padded to 256
DIMS = ModelDims(num_attention_heads=12, num_query_groups=4, head_dim=8, vocab_size=250, padded_vocab_size=256)
HIDDEN, FFN = 32, 48


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
    """A plausible shape for an HF tensor of the dense decoder (DIMS, HIDDEN, FFN)."""
    q, kv = DIMS.num_attention_heads * DIMS.head_dim, DIMS.num_query_groups * DIMS.head_dim
    table = {"embed_tokens": (250, HIDDEN), "lm_head": (250, HIDDEN), "q_proj.weight": (q, HIDDEN),
             "k_proj.weight": (kv, HIDDEN), "v_proj.weight": (kv, HIDDEN), "q_proj.bias": (q,),
             "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj": (HIDDEN, q), "gate_proj": (FFN, HIDDEN),
             "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN), "q_norm": (DIMS.head_dim,),
             "k_norm": (DIMS.head_dim,), "layernorm": (HIDDEN,), "model.norm": (HIDDEN,)}
    return next(shape for key, shape in table.items() if key in name)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("tied", [False, True])
def test_every_mapping_round_trips_exactly_at_every_tp(family, tied):
    """to_hf(unshard(shard(to_mcore(x)))) == x for each mapping of the family, TP 1, 2 and 4."""
    cfg = Qwen3Config(tie_word_embeddings=tied, attention_bias=family.default_qkv_bias)
    for m in family.mappings(cfg):
        hf = {role: _rand(*_hf_shape(name)) for role, name in m.hf_names(3).items()}
        full = m.to_mcore(hf, DIMS)
        for size in (1, 2, 4):
            parts = [shard(full, m.shard, r, size) for r in range(size)]
            back = m.to_hf(unshard(parts, m.shard), DIMS)
            assert back.keys() == hf.keys(), m.mcore
            for role in hf:
                assert torch.equal(back[role], hf[role]), (family.name, m.mcore, role, size)
