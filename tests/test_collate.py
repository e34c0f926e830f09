"""Collation (label shift, THD cu_seqlens, padding) and bin packing; no model involved."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megaswift.data.collate import collate_padded, collate_padding_free
from megaswift.data.template import IGNORE_INDEX
from megaswift.data.packing import efficiency, pack, pack_rows

A = {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}
B = {"input_ids": [20, 21, 22], "labels": [-100, 21, 22]}
C = {"input_ids": [30, 31], "labels": [30, -100]}


def test_padding_free_context_parallel_pads_each_sample():
    # cp=2: every sample padded to a multiple of 4 at its end, then the batch to multiple 8
    b = collate_padding_free([A, B, C], pad_id=0, multiple=8, cp=2)
    p = b.packed_seq_params
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 0, 30, 31, 0, 0, 0, 0, 0, 0]]
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12, 16] == p.cu_seqlens_kv_padded.tolist()
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 9, 13]   # real lengths (tail pad: its own)
    assert p.max_seqlen_q == 4
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]]
    shifted = [-100, 12, 13, -100, 21, 22, -100, -100, -100, -100] + [-100] * 6
    assert b.loss_mask.tolist() == [[float(t != IGNORE_INDEX) for t in shifted]]
    assert (b.num_real_tokens, b.num_padded_tokens) == (9, 7)
    # a fixed length (virtual pipeline) extends the tail; a micro-batch that overflows it fails
    assert collate_padding_free([A, B], pad_id=0, multiple=4, cp=2, length=16).num_tokens == 16
    with pytest.raises(ValueError, match="does not fit the fixed length 8"):
        collate_padding_free([A, B, C], pad_id=0, multiple=4, cp=2, length=8)


def test_padding_free_shift_and_boundaries():
    b = collate_padding_free([A, B, C], pad_id=0, multiple=1)
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 30, 31]]
    # target[t] = labels[t+1]; each sample's last position is never trained
    shifted = [-100, 12, 13, -100, 21, 22, -100, -100, -100]
    assert b.loss_mask.tolist() == [[float(t != IGNORE_INDEX) for t in shifted]]
    assert b.labels.tolist() == [[max(t, 0) for t in shifted]]
    assert b.labels.dtype == torch.long and b.loss_mask.dtype == torch.float32
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1]]
    p = b.packed_seq_params
    assert p.qkv_format == "thd" and p.cu_seqlens_q.dtype == torch.int32
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 9] == p.cu_seqlens_kv.tolist()
    assert p.max_seqlen_q == p.max_seqlen_kv == 4
    assert b.attention_mask is None
    assert (b.num_real_tokens, b.num_padded_tokens) == (9, 0)


def test_padding_free_pad_segment():
    b = collate_padding_free([A, B], pad_id=7, multiple=4)  # 7 tokens -> 8
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 7]]
    assert b.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 7, 8]  # padding: own segment
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert b.loss_mask[0, 7] == 0 and b.labels[0, 7] == 0
    assert (b.num_real_tokens, b.num_padded_tokens, b.num_tokens) == (7, 1, 8)
    b = collate_padding_free([{"input_ids": [30, 31], "labels": [30, 31]}], pad_id=0, multiple=6)
    assert b.packed_seq_params.cu_seqlens_q.tolist() == [0, 2, 6]  # pad segment > the sample
    assert b.packed_seq_params.max_seqlen_q == 4
    assert b.position_ids.tolist() == [[0, 1, 0, 1, 2, 3]]
    assert b.loss_mask.tolist() == [[1.0, 0, 0, 0, 0, 0]]
    exact = collate_padding_free([A], pad_id=0, multiple=4)  # already a multiple: no segment
    assert exact.packed_seq_params.cu_seqlens_q.tolist() == [0, 4]


def test_packed_rows_expand_to_sub_samples():
    (row,) = pack_rows([A, B], capacity=16)
    assert row["lengths"] == [4, 3]  # samples in index order inside a bin
    assert row["input_ids"] == A["input_ids"] + B["input_ids"]
    packed = collate_padding_free([row, C], pad_id=0, multiple=1)
    plain = collate_padding_free([A, B, C], pad_id=0, multiple=1)
    for name in ("input_ids", "labels", "loss_mask", "position_ids"):
        assert torch.equal(getattr(packed, name), getattr(plain, name)), name
    assert packed.packed_seq_params.cu_seqlens_q.tolist() == [0, 4, 7, 9]
    # the boundary between the packed samples is not trained across
    assert packed.loss_mask[0, 3] == 0
    with pytest.raises(ValueError, match="packing needs --padding_free true"):
        collate_padded([row], pad_id=0, multiple=1)
    with pytest.raises(ValueError, match="lengths"):
        collate_padding_free([{**row, "lengths": [4, 2]}], pad_id=0, multiple=1)


def test_padded_batch():
    b = collate_padded([A, C], pad_id=5, multiple=3)  # longest 4 -> 6
    assert b.input_ids.tolist() == [[10, 11, 12, 13, 5, 5], [30, 31, 5, 5, 5, 5]]
    assert b.loss_mask.tolist() == [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert b.labels.tolist() == [[0, 12, 13, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    assert b.position_ids.tolist() == [list(range(6))] * 2
    assert b.packed_seq_params is None
    m = b.attention_mask
    assert m.shape == (2, 1, 6, 6) and m.dtype == torch.bool
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    for i, n in enumerate((4, 2)):
        real = torch.arange(6) < n
        assert torch.equal(m[i, 0], ~(causal & real[None, :]))
    assert not m[1, 0, 1, 1] and m[1, 0, 1, 2] and m[1, 0, 5, 2]  # pad keys masked everywhere
    assert (b.num_real_tokens, b.num_padded_tokens) == (6, 6)
    assert collate_padded([C], pad_id=0, multiple=1).input_ids.shape == (1, 2)


def test_to_device_keeps_types():
    b = collate_padding_free([A, B], pad_id=0, multiple=2).to("cpu")
    assert b.packed_seq_params.cu_seqlens_q.dtype == torch.int32
    assert collate_padded([A], pad_id=0, multiple=1).to(torch.device("cpu")).attention_mask.dtype == torch.bool


def test_pack_basic_and_errors():
    assert pack([], 8) == []
    assert pack([5, 3, 4, 4], 8) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="sample 2 has 9 tokens"):
        pack([1, 2, 9], 8)


def test_pack_deterministic_and_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 512) for _ in range(3000)] + [512] * 20 + [1] * 20
    bins = pack(lengths, 1024)
    assert bins == pack(list(lengths), 1024)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    assert efficiency(bins, 1024, lengths) > 0.98
    rows = pack_rows([{"input_ids": [1] * n, "labels": [1] * n} for n in lengths[:200]], 1024)
    assert all(len(r["input_ids"]) <= 1024 and sum(r["lengths"]) == len(r["input_ids"]) for r in rows)
    assert efficiency(rows, 1024) == pytest.approx(sum(lengths[:200]) / (len(rows) * 1024))


def _alpaca_lengths() -> list[int]:
    from transformers import AutoTokenizer

    from megaswift.assets import fetch_llamafactory_data, fetch_smollm2

    tok = AutoTokenizer.from_pretrained(fetch_smollm2())
    rows = json.loads((fetch_llamafactory_data() / "alpaca_en_demo.json").read_text())
    lengths = []
    for r in rows:
        user = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        ids = tok.apply_chat_template([{"role": "user", "content": user},
                                       {"role": "assistant", "content": r["output"]}], tokenize=True)
        lengths.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return lengths


def test_pack_alpaca_efficiency():
    lengths = _alpaca_lengths()
    assert len(lengths) == 999
    bins = pack(lengths, 2048)
    eff = efficiency(bins, 2048, lengths)
    print(f"alpaca_en_demo: {sum(lengths)} tokens in {len(bins)} bins of 2048, efficiency {eff:.4f}")
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    assert eff >= 0.98
