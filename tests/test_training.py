"""`megatron sft` / `pt` on real gloo ranks: loss parity across layouts, exact resume, SIGTERM, errors.

All runs start from the same HF weights (a tiny llama with the SmolLM2 tokenizer) and train in
float32 on LLaMA-Factory's alpaca demo data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import logged, ok, precision_figures, run_cli, run_megatron, tiered
from megaswift.assets import fetch_llamafactory_data

ITERS = 5
RTOL = 1e-5


# 6 of the 48 rows are held out and evaluated after iteration ITERS (every rank reads them all
# whatever the layout: 10 eval micro-batches of 2 cover them), so eval_loss is a parity figure too.
EVAL = ["--split_dataset_ratio", "0.125", "--eval_interval", str(ITERS)]


def _sft_args(model_dir, dataset, save, iters=ITERS, *extra):
    return ["sft", "--model", str(model_dir), "--dataset", dataset, "--save", str(save),
            "--train_iters", str(iters), "--global_batch_size", "8", "--micro_batch_size", "2",
            "--lr", "1e-4", "--max_length", "512", "--add_version", "false", *EVAL, *extra]


_losses = logged


def _assert_parity(got: Path, ref: dict[str, dict[int, float]]) -> None:
    """Losses, gradient norms (what clipping uses) and evaluation losses equal the reference's, rel <= RTOL."""
    for key, want in ref.items():
        have = _losses(got, key)
        assert sorted(have) == sorted(want), (key, sorted(have))
        for it, w in want.items():
            assert abs(have[it] - w) / abs(w) <= RTOL, f"{key} at iteration {it}: {have[it]} vs {w}"


_ok = ok


@pytest.fixture(scope="module")
def reference(model_dir, dataset, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref") / "run"
    _ok(run_megatron(_sft_args(model_dir, dataset, save)))
    evals = _losses(save, "eval_loss")
    assert sorted(evals) == [ITERS] and evals[ITERS] < _losses(save)[1], evals  # evaluated, and learnt
    return {"loss": _losses(save), "grad_norm": _losses(save, "grad_norm"), "eval_loss": evals}


# SGD is not scale-invariant as Adam nearly is: a wrong gradient norm (and so a wrong clip factor)
# shows in the losses. --clip_grad 0.5 is below every iteration's norm here, so the clip is active.
SGD = ["--optimizer", "sgd", "--lr", "0.5", "--clip_grad", "0.5", "--use_distributed_optimizer", "false"]


@pytest.fixture(scope="module")
def sgd_reference(model_dir, dataset, tmp_path_factory):
    save = tmp_path_factory.mktemp("ref-sgd") / "run"
    _ok(run_megatron(_sft_args(model_dir, dataset, save, ITERS, *SGD)))
    norms = _losses(save, "grad_norm")
    assert min(norms.values()) > 0.5, norms  # clipping is active at every step
    return {"loss": _losses(save), "grad_norm": norms}


LAYOUTS = {
    "tp2": (2, ["--tensor_model_parallel_size", "2"]),
    "tp2_sp": (2, ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"]),
    "pp2": (2, ["--pipeline_model_parallel_size", "2"]),
    "pp2_uneven": (2, ["--pipeline_model_parallel_size", "2", "--decoder_first_pipeline_num_layers", "1"]),
    "pp2_vpp2": (2, ["--pipeline_model_parallel_size", "2", "--virtual_pipeline_model_parallel_size", "2"]),
    "dp2_distopt": (2, ["--use_distributed_optimizer", "true"]),
    "dp2_distopt_overlap": (2, ["--use_distributed_optimizer", "true", "--overlap_grad_reduce", "true",
                                "--overlap_param_gather", "true"]),
    "recompute_full": (1, ["--recompute_granularity", "full", "--recompute_method", "uniform",
                           "--recompute_num_layers", "1"]),
    # the reference recomputes core attention (Megatron-SWIFT's default, selective): the same numbers without
    "recompute_none": (1, ["--recompute_granularity", "none"]),
    "padded_batches": (1, ["--padding_free", "false"]),
    "tp2_pp2": (4, ["--tensor_model_parallel_size", "2", "--pipeline_model_parallel_size", "2",
                    "--sequence_parallel", "true"]),
    "cp2_thd": (2, ["--context_parallel_size", "2"]),
    "cp2_padded": (2, ["--context_parallel_size", "2", "--padding_free", "false"]),
    "cp2_tp2_sp": (4, ["--context_parallel_size", "2", "--tensor_model_parallel_size", "2",
                       "--sequence_parallel", "true"]),
}


@pytest.mark.parametrize("layout", tiered(sorted(LAYOUTS), {"tp2", "pp2_uneven", "pp2_vpp2", "dp2_distopt_overlap", "recompute_none",
                                                            "tp2_pp2", "cp2_padded", "cp2_tp2_sp"}))
def test_loss_parity_with_one_process(layout, reference, model_dir, dataset, tmp_path):
    nproc, flags = LAYOUTS[layout]
    _ok(run_megatron(_sft_args(model_dir, dataset, tmp_path / "run", ITERS, *flags), nproc=nproc, timeout=600))
    _assert_parity(tmp_path / "run", reference)
    got = _losses(tmp_path / "run")
    assert got[ITERS] < got[1]  # it learns
    if layout == "cp2_tp2_sp":  # a checkpoint trained at TP=2 x CP=2 exports to HF (at TP=1)
        out = _ok(run_megatron(["export", "--load", str(tmp_path / "run"), "--to_hf", "true",
                                "--save", str(tmp_path / "hf"), "--test_convert_precision", "true"]))
        figures = precision_figures(out.stderr)
        assert figures and all(d <= 1e-4 and a == 1.0 for d, a in figures.values()), figures


@pytest.mark.parametrize("nproc,flags", [
    (2, ["--tensor_model_parallel_size", "2", "--sequence_parallel", "true"]),
    (2, ["--pipeline_model_parallel_size", "2"]),
    pytest.param(2, [], marks=pytest.mark.slow),  # data parallel
], ids=["tp2_sp", "pp2", "dp2"])
def test_sgd_with_active_clipping_matches_one_process(nproc, flags, sgd_reference, model_dir, dataset, tmp_path):
    _ok(run_megatron(_sft_args(model_dir, dataset, tmp_path / "run", ITERS, *SGD, *flags), nproc=nproc, timeout=600))
    _assert_parity(tmp_path / "run", sgd_reference)


def test_slurm_ranks_match_one_process(reference, model_dir, dataset, tmp_path):
    """`srun megatron sft ...`: ranks from SLURM_PROCID / SLURM_NTASKS, master from the node list."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = _sft_args(model_dir, dataset, tmp_path / "run", ITERS, "--tensor_model_parallel_size", "2")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "NPROC_PER_NODE")}
    env.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "megaswift.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}) for r in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _assert_parity(tmp_path / "run", reference)


def test_two_nodes_of_one_process_match_one_process(reference, model_dir, dataset, tmp_path):
    """`NNODES=2 NODE_RANK=i NPROC_PER_NODE=1 megatron sft ...` on each node: torchrun underneath
    (here both "nodes" are this machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = _sft_args(model_dir, dataset, tmp_path / "run", ITERS, "--tensor_model_parallel_size", "2")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-m", "megaswift.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**env, "NODE_RANK": str(r)})
             for r in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-3000:] + errs[1][-3000:]
    _assert_parity(tmp_path / "run", reference)


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every worker below it (torchrun's workers outlive their parent)."""
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _kill_after_checkpoint(args, save: Path, at: int, nproc: int) -> None:
    """Run, SIGKILL the whole job as soon as checkpoint `at` is visible, leave it at `at`."""
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "megaswift.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tracker = save / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if tracker.exists() and tracker.read_text().strip() == str(at):
            _kill_tree(proc.pid)
            break
        time.sleep(0.05)
    proc.wait()
    # If the job outran the poll, step the tracker back: exactly what a kill right after `at` leaves.
    tracker.write_text(str(at))


@pytest.mark.parametrize("nproc,flags", [
    pytest.param(1, [], marks=pytest.mark.slow),
    (2, ["--use_distributed_optimizer", "true"]),
    pytest.param(2, ["--optimizer", "sgd", "--context_parallel_size", "2"], marks=pytest.mark.slow),  # SGD momentum; CP
], ids=["single", "dp2_distopt", "sgd_cp2"])
def test_resume_after_sigkill_equals_uninterrupted(nproc, flags, model_dir, dataset, tmp_path):
    full = tmp_path / "full"
    _ok(run_megatron(_sft_args(model_dir, dataset, full, 6, *flags), nproc=nproc))
    killed = tmp_path / "killed"
    _kill_after_checkpoint(_sft_args(model_dir, dataset, killed, 6, "--save_interval", "3", *flags), killed, 3, nproc)
    (killed / "logging.jsonl").unlink(missing_ok=True)
    resumed = tmp_path / "resumed"
    args = _sft_args(model_dir, dataset, resumed, 6, *flags)
    args[args.index("--model"):args.index("--model") + 2] = ["--load", str(killed)]
    out = _ok(run_megatron(args, nproc=nproc))
    assert "resumed from" in out.stderr and "at iteration 3" in out.stderr
    want, got = _losses(full), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for it in got:
        assert got[it] == want[it], f"iteration {it}: resumed {got[it]} vs uninterrupted {want[it]}"


def test_interrupted_save_leaves_previous_checkpoint(model_dir, dataset, tmp_path):
    save = tmp_path / "run"
    _ok(run_megatron(_sft_args(model_dir, dataset, save, 2, "--save_interval", "1")))
    (save / "latest_checkpointed_iteration.txt").write_text("1")
    half = save / "iter_0000002"
    for f in half.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])  # a save torn mid-write, tracker still at 1
    resumed = tmp_path / "resumed"
    args = _sft_args(model_dir, dataset, resumed, 2)
    args[args.index("--model"):args.index("--model") + 2] = ["--load", str(save)]
    out = _ok(run_megatron(args))
    assert "at iteration 1" in out.stderr and sorted(_losses(resumed)) == [2]


def test_sigterm_saves_and_exits_cleanly(model_dir, dataset, tmp_path):
    save = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NPROC_PER_NODE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "megaswift.cli", *_sft_args(model_dir, dataset, save, 50)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = save / "logging.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count('"loss"') >= 2):  # 2 iterations logged
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    it = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 2 <= it < 50 and "SIGTERM" in err


@pytest.mark.parametrize("nproc,flags,message", [
    (2, ["--tensor_model_parallel_size", "3"], "--tensor_model_parallel_size 3 does not divide num_attention_heads 4"),
    (1, ["--pipeline_model_parallel_size", "8"], "exceeds the model's 4 layers"),
    (2, ["--pipeline_model_parallel_size", "4"], "world size 2 is not divisible"),
    (1, ["--context_parallel_size", "2"], "--context_parallel_size"),
    (2, ["--context_parallel_size", "2", "--max_length", "510"],
     "--max_length/--packing_length 510 is not divisible by 4 (2 x --context_parallel_size 2)"),
    (2, ["--pipeline_model_parallel_size", "2", "--decoder_first_pipeline_num_layers", "5"],
     "do not fit the model's 4 layers"),
    (1, ["--global_batch_size", "7"], "--global_batch_size 7 is not a multiple of --micro_batch_size 2"),
    (1, ["--lr_warmup_iters", "2"], "--lr_warmup_iters 2 must be smaller than --lr_decay_iters/--train_iters 2"),
    (2, ["--optimizer", "sgd"], "--optimizer sgd with 2 data-parallel ranks needs --use_distributed_optimizer false"),
])
def test_invalid_layouts_fail_before_work(nproc, flags, message, model_dir, dataset, tmp_path):
    args = _sft_args(model_dir, dataset, tmp_path / "run", 2, *flags)
    # world-size checks need the ranks; the rest fail in the flags, so they run in this process
    proc = run_megatron(args, nproc=nproc) if nproc > 1 or "--context_parallel_size" in flags else run_cli(args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_pretraining_and_export_of_a_tp2_run(model_dir, tmp_path):
    c4 = str(fetch_llamafactory_data() / "c4_demo.jsonl") + "#32"
    save = tmp_path / "pt"
    _ok(run_megatron(["pt", "--model", str(model_dir), "--dataset", c4, "--save", str(save),
                      "--train_iters", "4", "--global_batch_size", "4", "--micro_batch_size", "2",
                      "--lr", "1e-3", "--max_length", "256", "--truncation_strategy", "right",
                      "--add_version", "false", "--tensor_model_parallel_size", "2"], nproc=2))
    losses = _losses(save)
    assert losses[4] < losses[1]
    out = _ok(run_megatron(["export", "--load", str(save), "--to_hf", "true", "--save", str(tmp_path / "hf"),
                            "--test_convert_precision", "true"]))
    figures = precision_figures(out.stderr)
    assert all(d <= 1e-4 and a == 1.0 for d, a in figures.values()), figures


def test_sft_from_packed_cached_dataset(model_dir, dataset, tmp_path):
    cached = tmp_path / "cached"
    _ok(run_megatron(["export", "--model", str(model_dir), "--to_cached_dataset", "true", "--dataset", dataset,
                      "--save", str(cached), "--packing", "true", "--packing_length", "1024"]))
    save = tmp_path / "run"
    _ok(run_megatron(["sft", "--model", str(model_dir), "--cached_dataset", str(cached), "--save", str(save),
                      "--train_iters", "4", "--global_batch_size", "2", "--micro_batch_size", "1",
                      "--lr", "1e-3", "--add_version", "false"]))
    losses = _losses(save)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
