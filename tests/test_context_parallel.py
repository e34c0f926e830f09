"""Context parallelism's layout (megaswift/context_parallel.py): padding, load balance, slicing, chunks."""

from __future__ import annotations

import pytest
import torch

from megaswift.context_parallel import (load_balanced_indices, pad_multiple, padded_length, query_chunks,
                                        slice_batch)
from megaswift.data.collate import collate_padded, collate_padding_free

A = {"input_ids": [10, 11, 12, 13], "labels": [-100, -100, 12, 13]}
B = {"input_ids": [20, 21, 22], "labels": [-100, 21, 22]}
C = {"input_ids": [30, 31], "labels": [30, -100]}


def test_pad_multiple():
    assert pad_multiple(1, False, 1) == 1
    assert pad_multiple(4, False, 1) == 1          # no SP: TP does not split the sequence
    assert pad_multiple(1, True, 1) == 1           # SP without TP is a no-op
    assert pad_multiple(4, True, 1) == 4
    assert pad_multiple(1, False, 2) == 4
    assert pad_multiple(2, True, 2) == 4           # lcm(2 x cp, tp x cp) = lcm(4, 4)
    assert pad_multiple(3, True, 2) == 12          # lcm(4, 6)
    assert pad_multiple(8, True, 4) == 32          # each CP rank's s/4 tokens split over 8 TP ranks


def test_load_balanced_indices():
    # one sequence of 8 over cp=2: chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert load_balanced_indices([8], 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_indices([8], 2, 1).tolist() == [2, 3, 4, 5]
    # per sequence when several are laid end to end
    assert load_balanced_indices([4, 8], 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    with pytest.raises(ValueError, match="multiple of 2 x context-parallel size = 4"):
        load_balanced_indices([6], 2, 0)


def test_context_parallel_slice_is_load_balanced_and_tiles_the_batch():
    b = collate_padding_free([A, B, C], pad_id=0, multiple=8, cp=2)
    r0, r1 = (slice_batch(b, 2, r) for r in (0, 1))
    # per 4-token sample: rank 0 holds tokens 0 and 3, rank 1 tokens 1 and 2
    assert r0.input_ids.tolist() == [[10, 13, 20, 0, 30, 0, 0, 0]]
    assert r1.input_ids.tolist() == [[11, 12, 21, 22, 31, 0, 0, 0]]
    assert r0.position_ids.tolist() == [[0, 3] * 4]
    assert r0.loss_mask.sum() + r1.loss_mask.sum() == b.loss_mask.sum()
    assert r0.packed_seq_params is b.packed_seq_params  # global bounds travel unchanged
    padded = collate_padded([A, B], pad_id=0, multiple=4)  # [2, 4], mask [2, 1, 4, 4]
    r1 = slice_batch(padded, 2, 1)
    assert r1.input_ids.tolist() == [[11, 12], [21, 22]]
    assert r1.attention_mask.shape == (2, 1, 2, 4)  # local queries, every key
    assert torch.equal(r1.attention_mask, padded.attention_mask[:, :, 1:3, :])
    assert slice_batch(padded, 1, 0) is padded


def test_padded_length():
    assert padded_length([4, 3, 2], 1) == 9
    assert padded_length([4, 3, 2], 2) == 12      # each sample to a multiple of 4
    assert padded_length([5], 4) == 8


@pytest.mark.parametrize("causal", [True, False])
def test_query_chunks_cover_every_local_row_once_with_the_right_keys(causal):
    lens, cp = [8, 16], 2
    for rank in range(cp):
        idx = load_balanced_indices(lens, cp, rank).tolist()
        seen = []
        for rows, keys in query_chunks(lens, cp, rank, causal):
            global_rows = idx[rows]
            seen += global_rows
            seq_start = 0 if global_rows[0] < 8 else 8
            assert keys.start == seq_start
            # causal: the keys end with the chunk's last query; otherwise the whole sequence
            assert keys.stop == (global_rows[-1] + 1 if causal else seq_start + (8 if seq_start == 0 else 16))
        assert seen == idx
