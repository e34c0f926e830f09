"""Padding-free (THD) micro-batches through the real megatron GPTModel: same per-token losses as
padded batches, no attention across samples, and the same losses at TP=2 + sequence parallel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_loss_parity import (ATOL, build_model, make_samples, max_diff,
                              thd_and_padded, token_losses)
from megaswift.args.parallel import ParallelArgs
from megaswift.data.collate import collate_padding_free
from megaswift.runtime.distributed import destroy_distributed, init_distributed

SCRIPT = Path(__file__).parent / "dist_loss_parity.py"


@pytest.fixture(scope="module")
def tp1_model(tiny_model_dir):
    src = tiny_model_dir("llama")
    parallel = ParallelArgs()
    init_distributed(parallel)
    try:
        model, _ = build_model(src, parallel)
        yield src, model
    finally:
        destroy_distributed()


@pytest.mark.parametrize("multiple", [1, 4, 16])
def test_thd_losses_match_padded(tp1_model, multiple):
    _, model = tp1_model
    thd, padded = thd_and_padded(model, make_samples(), multiple)
    assert [x.numel() for x in thd] == [8, 4, 12, 1, 6]
    assert all(torch.isfinite(x).all() for x in thd)
    assert max_diff(thd, padded) <= ATOL


def test_thd_loss_is_cross_entropy_of_shifted_targets(tp1_model):
    """Losses at position t score labels[t+1] (HF shift) and stop at sample boundaries."""
    _, model = tp1_model
    samples = make_samples()
    batch = collate_padding_free(samples, pad_id=0, multiple=4)
    losses = token_losses(model, batch)[0]
    logits = model(batch.input_ids, batch.position_ids, None,
                   packed_seq_params=batch.packed_seq_params).detach()[0].float()
    ids = batch.input_ids[0]
    mask = batch.loss_mask[0].bool()
    ends = batch.packed_seq_params.cu_seqlens_q[1:].long() - 1
    assert not mask[ends].any()  # a sample's last token never predicts the next sample's first
    want = torch.nn.functional.cross_entropy(logits, batch.labels[0], reduction="none")
    assert torch.allclose(losses[mask], want[mask], atol=ATOL)
    assert torch.equal(batch.labels[0][mask], ids.roll(-1)[mask])


def test_no_cross_sample_attention(tp1_model):
    _, model = tp1_model
    samples = make_samples()
    changed = [dict(s) for s in samples]
    g = torch.Generator().manual_seed(7)
    changed[1] = {**samples[1], "input_ids": torch.randint(0, 250, (21,), generator=g).tolist()}
    a = collate_padding_free(samples, pad_id=0, multiple=8)
    b = collate_padding_free(changed, pad_id=0, multiple=8)
    la = model(a.input_ids, a.position_ids, None, packed_seq_params=a.packed_seq_params)[0]
    lb = model(b.input_ids, b.position_ids, None, packed_seq_params=b.packed_seq_params)[0]
    cu = a.packed_seq_params.cu_seqlens_q.tolist()  # segments: 13, 6 (packed row), 21, 2, 9, pad
    perturbed = slice(cu[2], cu[3])
    assert not torch.equal(la[perturbed], lb[perturbed])
    keep = torch.ones(la.shape[0], dtype=torch.bool)
    keep[perturbed] = False
    assert torch.equal(la[keep], lb[keep]), "a sample's logits depend on another sample's tokens"


def test_tp2_sequence_parallel_parity(tp1_model, tmp_path):
    src, model = tp1_model
    thd, padded = thd_and_padded(model, make_samples(), 1)
    assert max_diff(thd, padded) <= ATOL
    ref = tmp_path / "tp1_losses.pt"
    torch.save({"losses": thd}, ref)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(SCRIPT), str(src), str(ref)],
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    print(out[-2000:])
    assert proc.returncode == 0, out[-4000:]
    assert out.count(" OK") == 2, out[-4000:]
