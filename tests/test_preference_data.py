"""Preference pairs from the data pipeline: every format to the same chosen/rejected tokens, labels
on the final assistant turn only, the shared prompt, collation order and cu_seqlens, packing that
never splits a pair, truncation, streaming/lazy, cached datasets and bad rows named by file and row."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import data_args
from megaswift.assets import fetch_llamafactory_data
from megaswift.data.cached import load_cached_datasets, write_cached_dataset
from megaswift.data.collate import (EMPTY_PAIR, PreferenceBatch, collate_padding_free, collate_preference,
                                    collate_preference_padded, sequence_index, sequence_sums)
from megaswift.data.formats import RowError
from megaswift.data.preference import (NO_REJECTED, PAIR_COLUMNS, PAIR_TOO_LONG, build_preference_datasets,
                                       is_preference_dataset)
from megaswift.data.template import IGNORE_INDEX

SYSTEM = "You are terse."
Q1, A1, Q2 = "Name a prime.", "Seven.", "And an even one?"
GOOD, BAD = "Two is even and prime.", "Nine, I think."


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _build(tok, path, **kw):
    return build_preference_datasets(data_args(dataset=[path] if isinstance(path, str) else path, **kw), tok)


def _pair(row) -> tuple:
    return tuple(tuple(row[k]) for k in PAIR_COLUMNS)


def _trained(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def _user(t):
    return {"role": "user", "content": t}


def _asst(t):
    return {"role": "assistant", "content": t}


def _multi_turn_files(tmp_path):
    """One multi-turn preference row (system, Q1, A1, Q2 -> GOOD | BAD) in every format that can say it."""
    prompt = [{"role": "system", "content": SYSTEM}, _user(Q1), _asst(A1), _user(Q2)]
    share = [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1}, {"from": "human", "value": Q2}]
    rows = {
        "ms-swift": {"messages": prompt + [_asst(GOOD)], "rejected_response": BAD},
        "ms-swift rejected_messages": {"messages": prompt + [_asst(GOOD)], "rejected_messages": prompt + [_asst(BAD)]},
        "llamafactory sharegpt": {"conversations": share, "system": SYSTEM,
                                  "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
        "llamafactory alpaca": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2, "input": "",
                                "chosen": GOOD, "rejected": BAD},
        "llamafactory alpaca output list": {"system": SYSTEM, "history": [[Q1, A1]], "instruction": Q2,
                                            "output": [GOOD, BAD]},
        "trl conversational": {"prompt": prompt, "chosen": [_asst(GOOD)], "rejected": [_asst(BAD)]},
        "trl implicit prompt": {"chosen": prompt + [_asst(GOOD)], "rejected": prompt + [_asst(BAD)]},
        "chosen_messages": {"chosen_messages": prompt + [_asst(GOOD)], "rejected_messages": prompt + [_asst(BAD)]},
    }
    return {name: _write(tmp_path / f"{i}.jsonl", [row]) for i, (name, row) in enumerate(rows.items())}


def test_every_format_gives_the_same_pair_trained_on_the_last_turn(tok, tmp_path):
    pairs, files = {}, _multi_turn_files(tmp_path)
    for name, path in files.items():
        train, val, stats = _build(tok, path, strict=True)
        assert val is None and len(train) == 1 and stats.rows == 1, name
        assert set(train.column_names) == {*PAIR_COLUMNS, "length"}
        pairs[name] = _pair(train[0])
    first = pairs["ms-swift"]
    assert all(p == first for p in pairs.values()), [n for n, p in pairs.items() if p != first]
    c_ids, c_labels, r_ids, r_labels = first
    # labels only on the final assistant turn: A1 in the history is not trained
    assert _trained(tok, c_ids, c_labels) == GOOD + "<|im_end|>"
    assert _trained(tok, r_ids, r_labels) == BAD + "<|im_end|>"
    # the pair shares the whole prompt, up to and including the assistant header
    start = next(i for i, t in enumerate(c_labels) if t != IGNORE_INDEX)
    assert c_ids[:start] == r_ids[:start] and start == next(i for i, t in enumerate(r_labels) if t != IGNORE_INDEX)
    assert tok.decode(c_ids[:start]).endswith(f"{Q2}<|im_end|>\n<|im_start|>assistant\n")
    assert SYSTEM in tok.decode(c_ids[:start]) and A1 in tok.decode(c_ids[:start])
    train, _, _ = _build(tok, files["ms-swift"], loss_scale="default")
    assert _pair(train[0]) == first  # --loss_scale default means last_round for preference data


def test_single_turn_string_formats(tok, tmp_path):
    rows = {"trl strings": {"prompt": Q2, "chosen": GOOD, "rejected": BAD},
            "llamafactory sharegpt": {"conversations": [{"from": "human", "value": Q2}],
                                      "chosen": {"from": "gpt", "value": GOOD}, "rejected": {"from": "gpt", "value": BAD}},
            "alpaca": {"instruction": Q2, "chosen": GOOD, "rejected": BAD},
            "query/response": {"query": Q2, "response": GOOD, "rejected_response": BAD}}
    got = {name: _pair(_build(tok, _write(tmp_path / f"{i}.jsonl", [r]), strict=True)[0][0])
           for i, (name, r) in enumerate(rows.items())}
    assert len(set(got.values())) == 1, got
    c_ids, c_labels, r_ids, r_labels = got["trl strings"]
    assert (_trained(tok, c_ids, c_labels), _trained(tok, r_ids, r_labels)) == (GOOD + "<|im_end|>", BAD + "<|im_end|>")


def test_llamafactory_demo_files(tok):
    """dpo_en_demo.json (registered in dataset_info.json as a sharegpt ranking set) and v1_dpo_demo.jsonl."""
    d = fetch_llamafactory_data()
    info = json.loads((d / "dataset_info.json").read_text())["dpo_en_demo"]
    assert info["ranking"] and info["formatting"] == "sharegpt"
    raw = json.loads((d / "dpo_en_demo.json").read_text())[:12]
    train, _, stats = _build(tok, str(d / "dpo_en_demo.json") + "#12", strict=True, dataset_shuffle=False)
    assert len(train) == 12 and stats.rows == 12 and stats.dropped == {}
    for row, want in zip(train, raw):
        assert _trained(tok, row["chosen_input_ids"], row["chosen_labels"]) == want["chosen"]["value"] + "<|im_end|>"
        assert _trained(tok, row["rejected_input_ids"], row["rejected_labels"]) == want["rejected"]["value"] + "<|im_end|>"
        assert row["length"] == len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
    if (d / "v1_dpo_demo.jsonl").exists():
        v1, _, _ = _build(tok, str(d / "v1_dpo_demo.jsonl"), strict=True, dataset_shuffle=False)
        first = json.loads((d / "v1_dpo_demo.jsonl").read_text().splitlines()[0])
        want = first["rejected_messages"][-1]["content"][0]["value"]
        assert _trained(tok, v1[0]["rejected_input_ids"], v1[0]["rejected_labels"]) == want + "<|im_end|>"


# ---- collation ------------------------------------------------------------------------------

P0 = {"chosen_input_ids": [1, 2, 3, 4], "chosen_labels": [-100, -100, 3, 4],
      "rejected_input_ids": [1, 2, 5], "rejected_labels": [-100, -100, 5], "length": 7}
P1 = {"chosen_input_ids": [7, 8], "chosen_labels": [-100, 8],
      "rejected_input_ids": [7, 9, 9, 9, 9], "rejected_labels": [-100, 9, 9, 9, 9], "length": 7}
PACKED = {"input_ids": [1, 2, 3, 4, 1, 2, 5, 7, 8, 7, 9, 9, 9, 9], "labels": P0["chosen_labels"] + P0["rejected_labels"]
          + P1["chosen_labels"] + P1["rejected_labels"], "lengths": [4, 3, 2, 5], "pairs": 2}


def test_collate_preference_order_and_cu_seqlens():
    b = collate_preference([P0, P1], pad_id=0, multiple=8)
    assert isinstance(b, PreferenceBatch) and b.num_pairs == 2
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 1, 2, 5, 7, 8, 7, 9, 9, 9, 9, 0, 0]]  # c0 r0 c1 r1, tail pad
    p = b.packed_seq_params
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 9, 14, 16] and p.cu_seqlens_q_padded is None
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1]]
    # labels shifted inside each sequence: position t holds token t+1's label, a sequence's last position none
    shifted = [-100, 3, 4, -100, -100, 5, -100, 8, -100, 9, 9, 9, 9, -100, -100, -100]
    assert b.loss_mask.tolist() == [[float(t != IGNORE_INDEX) for t in shifted]]
    assert b.labels.tolist() == [[max(t, 0) for t in shifted]]
    assert sequence_index(b).tolist() == [[0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, -1, -1]]
    assert sequence_sums(torch.ones(1, 16), b).tolist() == [2.0, 1.0, 1.0, 4.0]  # trained tokens per sequence
    # a packed row of the same pairs gives the same batch
    packed = collate_preference([PACKED], pad_id=0, multiple=8)
    assert packed.num_pairs == 2 and torch.equal(packed.input_ids, b.input_ids)
    assert torch.equal(packed.loss_mask, b.loss_mask) and torch.equal(packed.packed_seq_params.cu_seqlens_q, p.cu_seqlens_q)
    # a per-token value summed per sequence, differentiably, e.g. -log p from megatron's loss
    values = torch.arange(16, dtype=torch.float32)[None].requires_grad_()
    sums = sequence_sums(values, b)
    assert sums.tolist() == [1 + 2, 5, 7, 9 + 10 + 11 + 12]
    sums.sum().backward()
    assert values.grad.tolist() == b.loss_mask.tolist()
    moved = b.to("cpu")
    assert isinstance(moved, PreferenceBatch) and moved.num_pairs == 2


def test_collate_preference_context_parallel_bounds():
    b = collate_preference([P0, P1], pad_id=0, multiple=8, cp=2)  # each sequence padded to a multiple of 4
    p = b.packed_seq_params
    assert p.cu_seqlens_q_padded.tolist() == [0, 4, 8, 12, 20, 24]
    assert p.cu_seqlens_q.tolist() == [0, 4, 7, 9, 14, 18]  # real lengths: not positions
    idx = sequence_index(b)[0].tolist()
    assert idx == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 8 + [-1] * 4
    full = sequence_sums(torch.ones(1, 24), b)
    assert full.tolist() == [2.0, 1.0, 1.0, 4.0]
    from megaswift.context_parallel import slice_batch

    values = torch.randn(1, 24)
    shares = []
    for rank in range(2):
        local = slice_batch(b, 2, rank)
        v = values.index_select(1, slice_batch(dataclass_with_ids(b), 2, rank).input_ids[0])
        shares.append(sequence_sums(v, local, cp_size=2, cp_rank=rank))
    assert torch.allclose(shares[0] + shares[1], sequence_sums(values, b))


def dataclass_with_ids(b):
    """The batch with input_ids replaced by positions, to learn which positions a CP rank holds."""
    import dataclasses

    return dataclasses.replace(b, input_ids=torch.arange(b.input_ids.shape[1])[None])


def test_collate_preference_padded_and_refusals():
    b = collate_preference_padded([P0, P1], pad_id=0, multiple=4)
    assert b.num_pairs == 2 and b.packed_seq_params is None and b.input_ids.shape == (4, 8)
    assert b.input_ids[:, :5].tolist() == [[1, 2, 3, 4, 0], [1, 2, 5, 0, 0], [7, 8, 0, 0, 0], [7, 9, 9, 9, 9]]
    assert sequence_sums(torch.ones(4, 8), b).tolist() == [2.0, 1.0, 1.0, 4.0]
    with pytest.raises(ValueError, match="packing needs --padding_free true"):
        collate_preference_padded([PACKED], pad_id=0, multiple=4)
    with pytest.raises(ValueError, match="not a preference pair"):
        collate_preference([{"input_ids": [1, 2], "labels": [1, 2]}], pad_id=0, multiple=1)
    with pytest.raises(ValueError, match="collate_preference"):
        collate_padding_free([PACKED], pad_id=0, multiple=1)
    with pytest.raises(ValueError, match="collate_preference"):
        collate_padding_free([P0], pad_id=0, multiple=1)
    with pytest.raises(ValueError, match="2 lengths per pair"):
        collate_preference([{**PACKED, "pairs": 3}], pad_id=0, multiple=1)
    for stand_in in (EMPTY_PAIR, {"input_ids": [0], "labels": [IGNORE_INDEX]}):  # the trainer's EMPTY_SAMPLE too
        empty = collate_preference([stand_in], pad_id=0, multiple=1)
        assert empty.num_pairs == 1 and sequence_sums(torch.ones(1, 2), empty).tolist() == [0.0, 0.0]


# ---- truncation, packing, streaming, lazy, cached -------------------------------------------

def _dpo(n):
    return str(fetch_llamafactory_data() / "dpo_en_demo.json") + f"#{n}"


def test_truncation_applies_to_each_sequence(tok, tmp_path):
    path = _write(tmp_path / "t.jsonl", [{"prompt": "word " * 60, "chosen": "ok", "rejected": "no"},
                                         {"prompt": "hi", "chosen": "hello " * 60, "rejected": "bye"},
                                         {"prompt": "hi", "chosen": "hello", "rejected": "bye"}])
    _, _, stats = _build(tok, path, max_length=48)
    assert stats.rows == 1 and stats.dropped == {"too long": 2} and stats.truncated == 0
    train, _, stats = _build(tok, path, max_length=48, truncation_strategy="left")
    assert stats.rows == 3 and stats.truncated == 2
    assert all(len(r[k]) <= 48 for r in train for k in ("chosen_input_ids", "rejected_input_ids"))
    _, _, stats = _build(tok, path, max_length=48, truncation_strategy="right")
    assert stats.dropped == {"no trained tokens": 1} and stats.rows == 2  # the long prompt left no answer
    with pytest.raises(RowError, match=r"t.jsonl row 0: too long \(--max_length 48\)"):
        _build(tok, path, max_length=48, strict=True)


def test_packing_never_splits_a_pair(tok):
    kw = dict(max_length=300, truncation_strategy="left", dataset_shuffle=False)
    pairs, _, pstats = _build(tok, _dpo(40), **kw)
    packed, _, stats = _build(tok, _dpo(40), packing=True, packing_length=700, **kw)
    assert set(packed.column_names) == {"input_ids", "labels", "lengths", "pairs"} and is_preference_dataset(packed)
    assert stats.packed_rows == len(packed) < len(pairs) and stats.rows == pstats.rows == len(pairs)
    got = []
    for row in packed:
        assert len(row["lengths"]) == 2 * row["pairs"] and sum(row["lengths"]) == len(row["input_ids"]) <= 700
        bounds = [0]
        for n in row["lengths"]:
            bounds.append(bounds[-1] + n)
        seqs = [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(bounds, bounds[1:])]
        for (c_ids, c_labels), (r_ids, r_labels) in zip(seqs[0::2], seqs[1::2]):
            got.append((tuple(c_ids), tuple(c_labels), tuple(r_ids), tuple(r_labels)))
    assert Counter(got) == Counter(_pair(r) for r in pairs)  # every pair once, chosen before its rejected
    batch = collate_preference(packed.select(range(2)).to_list(), pad_id=0, multiple=1)
    assert batch.num_pairs == sum(packed[:2]["pairs"])


def test_pairs_longer_than_a_packed_row(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "word " * 20, "chosen": "yes " * 20, "rejected": "no"},
                                         {"prompt": "hi", "chosen": "hello", "rejected": "bye"}])
    _, _, stats = _build(tok, path, packing=True, packing_length=100)
    assert stats.dropped == {PAIR_TOO_LONG: 1} and stats.rows == 1
    train, _, stats = _build(tok, path, packing=True, packing_length=100, truncation_strategy="left")
    assert stats.rows == 2 and stats.truncated == 1 and all(sum(r) <= 100 for r in train["lengths"])
    with pytest.raises(RowError, match=r"p.jsonl row 0: pair longer than --packing_length \(.* > --packing_length 100"):
        _build(tok, path, packing=True, packing_length=100, strict=True)


def test_split_streaming_lazy_and_cached(tok, tmp_path):
    eager, val, stats = _build(tok, _dpo(20), max_length=256, truncation_strategy="left", split_dataset_ratio=0.2)
    assert len(eager) == 16 and len(val) == 4 and stats.val["rows"] == 4
    eager, _, _ = _build(tok, _dpo(20), max_length=256, truncation_strategy="left", dataset_shuffle=False)
    lazy, _, _ = _build(tok, _dpo(20), max_length=256, truncation_strategy="left", dataset_shuffle=False,
                        lazy_tokenize=True)
    assert is_preference_dataset(lazy) and [lazy[i] for i in range(len(lazy))] == eager.to_list()
    stream, _, _ = _build(tok, _dpo(20), max_length=256, truncation_strategy="left", dataset_shuffle=False,
                          streaming=True)
    assert [dict(r) for r in stream] == eager.to_list()
    kw = dict(max_length=256, truncation_strategy="left", dataset_shuffle=False, packing=True, packing_length=600)
    packed, _, _ = _build(tok, _dpo(20), **kw)
    stream, _, _ = _build(tok, _dpo(20), streaming=True, **kw)
    assert is_preference_dataset(stream) and [dict(r) for r in stream] == packed.to_list()
    out = tmp_path / "cached"
    out.mkdir()
    written = write_cached_dataset(data_args(dataset=[_dpo(20)], **kw), tok, out, preference=True)
    assert json.loads((out / "stats.json").read_text())["preference"] is True
    train, _ = load_cached_datasets([str(out)])
    assert is_preference_dataset(train) and train.to_list() == packed.to_list() and written.rows == 20


# ---- bad rows -------------------------------------------------------------------------------

def test_missing_rejected_names_file_and_row(tok, tmp_path):
    good = {"messages": [_user("q"), _asst("a")], "rejected_response": "b"}
    sft = {"messages": [_user("q"), _asst("a")]}
    path = _write(tmp_path / "mixed.jsonl", [good, sft, good])
    with pytest.raises(RowError, match=r"mixed.jsonl row 1: no rejected response \(a preference row needs"):
        _build(tok, path, strict=True)
    train, _, stats = _build(tok, path)
    assert len(train) == 2 and stats.dropped == {NO_REJECTED: 1}
    only_sft = _write(tmp_path / "sft.jsonl", [sft, sft])
    with pytest.raises(ValueError, match=r"sft.jsonl row 0: no rejected response .* none of the 2 rows"):
        _build(tok, only_sft)
    with pytest.raises(ValueError, match=r"no usable training preference \(streamed\) rows in .*sft.jsonl: "
                                         "2/2 rows dropped as no rejected response"):
        _build(tok, only_sft, streaming=True)
    with pytest.raises(RowError, match=r"mixed.jsonl row 1: no rejected response"):
        _build(tok, path, streaming=True, strict=True, dataset_shuffle=False)
    lazy, _, _ = _build(tok, path, lazy_tokenize=True)  # checked up front, not on access
    assert len(lazy) == 2 and lazy[1] is not None


@pytest.mark.parametrize("row,message", [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
     r"row 1: missing field \(no 'rejected'\)"),
    ({"prompt": "q", "chosen": "a", "rejected": " "}, r"row 1: empty assistant turn \(the rejected response is empty\)"),
    ({"chosen": [_user("q"), _asst("a")], "rejected": [_user("other q"), _asst("b")]}, r"row 1: prompt mismatch"),
    ({"instruction": "q", "output": ["a", "b", "c"]}, r"row 1: wrong type \(a list 'output' must be \[chosen, rejected\]"),
    ({"chosen": "a", "rejected": "b"}, r"row 1: missing field \(string 'chosen'/'rejected' need a 'prompt'\)"),
])
def test_bad_rows_name_file_and_row(tok, tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(RowError, match="bad.jsonl " + message):
        _build(tok, path, strict=True)
    train, _, stats = _build(tok, path)
    assert len(train) == 1 and sum(stats.dropped.values()) == 1
