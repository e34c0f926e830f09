"""`--streaming true` and `--lazy_tokenize true` through the real `megatron sft` / `megatron pt`.

Streams: the global batch of step i is stream samples [i*G, (i+1)*G) counted over passes, rank r
takes its contiguous share (as the non-streaming sampler does), resume re-reads and skips k*G
samples, `--packing true` packs on the fly. Unshuffled, a stream trains on exactly the batches of
the non-streaming run with `--train_dataloader_shuffle false`, so the losses agree.
"""

from __future__ import annotations

import math
import shutil

import pytest

from conftest import logged, ok, run_megatron
from megaswift.assets import fetch_llamafactory_data
from megaswift.data.packing import pack_rows, pack_stream
from megaswift.training.batches import StreamBatches

RTOL = 1e-5


def _alpaca(n: int) -> str:
    return str(fetch_llamafactory_data() / "alpaca_en_demo.json") + f"#{n}"


def _args(model_dir, dataset, save, iters, *extra, mode="sft"):
    return [mode, "--model", str(model_dir), "--dataset", dataset, "--save", str(save),
            "--train_iters", str(iters), "--global_batch_size", "8", "--micro_batch_size", "2",
            "--lr", "1e-4", "--max_length", "512", "--add_version", "false", *extra]


_losses, _ok = logged, ok


def _assert_close(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want)
    for it, ref in want.items():
        assert math.isfinite(got[it]) and abs(got[it] - ref) <= rtol * abs(ref), f"iteration {it}: {got[it]} vs {ref}"


# ---- unit level: on-the-fly packing and the stream's global batches -------------------------

def _rows(lengths):
    return [{"input_ids": list(range(n)), "labels": list(range(n))} for n in lengths]


def test_pack_stream_equals_pack_rows_within_one_window():
    rows = _rows([5, 3, 9, 2, 7, 7, 1, 4])
    assert list(pack_stream(iter(rows), 10, window=8)) == pack_rows(rows, 10)
    assert list(pack_stream(iter(rows), 10, window=100)) == pack_rows(rows, 10)


def test_pack_stream_bounded_window_keeps_every_sample_once():
    lengths = [(i * 37) % 23 + 1 for i in range(500)]
    rows = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate(lengths)]
    packed = list(pack_stream(iter(rows), 40, window=16))
    assert packed == list(pack_stream(iter(rows), 40, window=16))  # deterministic
    assert all(len(r["input_ids"]) <= 40 and sum(r["lengths"]) == len(r["input_ids"]) for r in packed)
    samples = sorted(tuple(r["input_ids"][s:s + n]) for r in packed
                     for s, n in zip([sum(r["lengths"][:k]) for k in range(len(r["lengths"]))], r["lengths"]))
    assert samples == sorted(tuple(r["input_ids"]) for r in rows)
    # the emptiest bin is carried over, so rows are nearly full: within 10% of the best packing
    assert len(packed) <= 1.1 * len(pack_rows(rows, 40))


class _Stream:
    """A list read as a stream; set_epoch reverses odd passes (stands in for a re-seeded shuffle)."""

    def __init__(self, n):
        self.rows = [{"input_ids": [i] * (i % 3 + 1), "labels": [i] * (i % 3 + 1)} for i in range(n)]
        self.epoch = 0

    def set_epoch(self, e):
        self.epoch = e

    def __iter__(self):
        return iter(self.rows[::-1] if self.epoch % 2 else self.rows)


def _ids(step):
    return [[s["input_ids"][0] for s in mb] for mb in step.micro_batches]


def test_stream_batches_shares_resume_and_max_epochs():
    g, mbs, dp = 8, 2, 2
    full = [StreamBatches(_Stream(20), g, mbs, r, dp) for r in range(dp)]
    steps = [[_ids(b.step(i)) for i in range(6)] for b in full]
    order = list(range(20)) + list(range(19, -1, -1)) + list(range(20))  # three passes
    for i in range(6):  # rank r holds the r-th contiguous half of the global batch, in micro-batches
        glob = [x for r in range(dp) for mb in steps[r][i] for x in mb]
        assert glob == order[i * g:(i + 1) * g]
        assert steps[0][i] == [order[i * g + k:i * g + k + mbs] for k in range(0, g // dp, mbs)]
    resumed = StreamBatches(_Stream(20), g, mbs, 1, dp)  # a fresh reader positioned at step 4
    assert [_ids(resumed.step(i)) for i in (4, 5)] == steps[1][4:6]
    capped = StreamBatches(_Stream(20), g, mbs, 0, dp, max_epochs=2)  # 40 samples: 5 full steps
    assert all(capped.step(i) is not None for i in range(5)) and capped.step(5) is None
    assert StreamBatches(_Stream(20), g, mbs, 0, dp, max_epochs=2).step(5) is None  # resumed past the end
    assert full[0].step(0).global_tokens == sum(i % 3 + 1 for i in range(8))


# ---- the real CLI ---------------------------------------------------------------------------

def test_streaming_sft_equals_non_streaming_unshuffled(model_dir, tmp_path):
    """20 rows, 4 steps of 8: the third step crosses into the second pass."""
    flags = ("--dataset_shuffle", "false")
    _ok(run_megatron(_args(model_dir, _alpaca(20), tmp_path / "stream", 4, *flags, "--streaming", "true")))
    _ok(run_megatron(_args(model_dir, _alpaca(20), tmp_path / "eager", 4, *flags,
                           "--train_dataloader_shuffle", "false", "--split_dataset_ratio", "0")))
    stream, eager = _losses(tmp_path / "stream"), _losses(tmp_path / "eager")
    assert sorted(stream) == [1, 2, 3, 4]
    _assert_close(stream, eager, 1e-6)


@pytest.fixture(scope="module")
def stream_run(model_dir, tmp_path_factory):
    """6 shuffled streaming steps over 20 rows (2.4 passes), checkpoints at 3 and 6."""
    save = tmp_path_factory.mktemp("stream") / "run"
    _ok(run_megatron(_args(model_dir, _alpaca(20), save, 6, "--streaming", "true", "--save_interval", "3")))
    return save


def test_streaming_dp2_matches_one_process(stream_run, model_dir, tmp_path):
    out = _ok(run_megatron(_args(model_dir, _alpaca(20), tmp_path / "dp2", 6, "--streaming", "true",
                                 "--use_distributed_optimizer", "true"), nproc=2))
    assert "each of 2 data-parallel ranks" in out.stderr
    want = _losses(stream_run)
    assert all(math.isfinite(v) for v in want.values()) and want[6] < want[1]
    _assert_close(_losses(tmp_path / "dp2"), want, RTOL)


def test_streaming_resume_mid_stream_equals_uninterrupted(stream_run, model_dir, tmp_path):
    killed = tmp_path / "killed"
    shutil.copytree(stream_run, killed)
    (killed / "latest_checkpointed_iteration.txt").write_text("3")  # as if killed right after step 3
    shutil.rmtree(killed / "iter_0000006")
    (killed / "logging.jsonl").unlink()
    args = _args(model_dir, _alpaca(20), tmp_path / "resumed", 6, "--streaming", "true")
    args[args.index("--model"):args.index("--model") + 2] = ["--load", str(killed)]
    out = _ok(run_megatron(args))
    assert "resumed from" in out.stderr and "at iteration 3" in out.stderr
    got, want = _losses(tmp_path / "resumed"), _losses(stream_run)
    assert sorted(got) == [4, 5, 6]
    for it in got:
        assert got[it] == want[it], f"iteration {it}: resumed {got[it]} vs uninterrupted {want[it]}"


def test_streaming_max_epochs_and_train_iters(model_dir, tmp_path):
    # 20 rows (none over 2048 tokens) x 2 passes = 40 samples = 5 global batches of 8: stops after
    # step 5 of 10, with a checkpoint
    out = _ok(run_megatron(_args(model_dir, _alpaca(20), tmp_path / "run", 10, "--streaming", "true",
                                 "--max_epochs", "2", "--max_length", "2048")))
    assert "the training stream is exhausted; stopped after iteration 5" in out.stderr
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    args = _args(model_dir, _alpaca(20), tmp_path / "no_iters", 1, "--streaming", "true", "--max_epochs", "1")
    i = args.index("--train_iters")
    del args[i:i + 2]
    proc = run_megatron(args)
    assert proc.returncode != 0 and "--train_iters is required" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_pt_streaming_packing_dp2_equals_packed_dataset(model_dir, tmp_path):
    """c4: 32 documents cut to 256 tokens packed into 7 rows of 1024; 4 steps of 4 rows cross passes."""
    c4 = str(fetch_llamafactory_data() / "c4_demo.jsonl") + "#32"

    def args(save, *extra):
        return _args(model_dir, c4, save, 4, "--packing", "true", "--packing_length", "1024",
                     "--max_length", "256", "--truncation_strategy", "right", "--global_batch_size", "4",
                     "--micro_batch_size", "1", "--lr", "1e-3", "--dataset_shuffle", "false", *extra, mode="pt")

    _ok(run_megatron(args(tmp_path / "stream", "--streaming", "true", "--use_distributed_optimizer", "true"),
                     nproc=2))
    out = _ok(run_megatron(args(tmp_path / "packed", "--train_dataloader_shuffle", "false", "--split_dataset_ratio", "0")))
    assert "packed 32 samples into 7 rows of 1024 tokens" in out.stderr
    stream, packed = _losses(tmp_path / "stream"), _losses(tmp_path / "packed")
    assert stream[4] < stream[1]
    _assert_close(stream, packed, RTOL)


def test_lazy_tokenize_same_losses(model_dir, tmp_path):
    # --max_length 2048 drops none of the 48 rows: lazy and eager train on the same rows in the same order
    flags = ("--max_length", "2048")
    _ok(run_megatron(_args(model_dir, _alpaca(48), tmp_path / "lazy", 4, *flags, "--lazy_tokenize", "true")))
    _ok(run_megatron(_args(model_dir, _alpaca(48), tmp_path / "eager", 4, *flags)))
    _assert_close(_losses(tmp_path / "lazy"), _losses(tmp_path / "eager"), 1e-6)


def test_lazy_tokenize_drops_on_access_dp2(model_dir, tmp_path):
    """--max_length 512 drops one of the 48 rows only when it is reached: its micro-batch is shorter."""
    out = _ok(run_megatron(_args(model_dir, _alpaca(48), tmp_path / "run", 6, "--lazy_tokenize", "true",
                                 "--use_distributed_optimizer", "true"), nproc=2))
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert "--lazy_tokenize: dropped" in out.stderr and "too long" in out.stderr
