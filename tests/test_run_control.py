"""Run control: resuming into the run's own directory, stopping a run from the outside, and the
output checks that keep inputs, existing runs and half-made run directories safe.

Same fixtures as test_training.py: a tiny llama with the SmolLM2 tokenizer (which saves a
chat_template.jinja) on LLaMA-Factory's alpaca demo data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import logged, ok, run_cli, run_megatron
from tiny_models import make_tiny_model

TRACKER = "latest_checkpointed_iteration.txt"


def _sft_args(model_dir, dataset, save, iters=2, *extra):
    args = ["sft", "--model", str(model_dir), "--dataset", dataset, "--train_iters", str(iters),
            "--global_batch_size", "8", "--micro_batch_size", "2", "--lr", "1e-4", "--max_length", "512",
            "--add_version", "false", *extra]
    return args + (["--save", str(save)] if save is not None else [])


_losses, _ok = logged, ok


def _failed_in_one_line(proc, *phrases):
    """Non-zero exit, `megatron <cmd>: error: ...` naming `phrases`, and no traceback."""
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if re.match(r"megatron \w+: error: ", line)]
    assert errors, proc.stderr[-3000:]
    for p in phrases:
        assert p in errors[0], errors[0]
    return errors[0]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _resume_args(args: list[str], load: Path) -> list[str]:
    i = args.index("--model")
    return args[:i] + ["--load", str(load)] + args[i + 2:]


# 1. --load X --save X (Megatron-LM's resume) with a chat_template.jinja in hf_config/

def test_resume_into_its_own_directory(model_dir, dataset, tmp_path):
    assert (model_dir / "chat_template.jinja").exists()  # transformers 5 writes it with the tokenizer
    run = tmp_path / "run"
    _ok(run_megatron(_sft_args(model_dir, dataset, run, 2)))
    out = _ok(run_megatron(_resume_args(_sft_args(model_dir, dataset, run, 4), run)))
    assert "at iteration 2" in out.stderr
    assert sorted(_losses(run)) == [1, 2, 3, 4]  # one logging.jsonl for the whole run
    assert (run / TRACKER).read_text().strip() == "4"
    assert (run / "hf_config" / "chat_template.jinja").read_bytes() == (model_dir / "chat_template.jinja").read_bytes()


# 2. --save must never destroy the input, and a bad --save fails in one line

@pytest.fixture
def model_copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink"])
def test_export_refuses_save_over_its_model(where, model_copy, tmp_path):
    before = _snapshot(model_copy)
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    save = {"same": model_copy, "inside": model_copy / "mcore", "contains": tmp_path, "symlink": link}[where]
    proc = run_cli(["export", "--model", str(model_copy), "--to_mcore", "true", "--save", str(save),
                         "--overwrite", "true"])
    _failed_in_one_line(proc, "--save", "--model")
    assert _snapshot(model_copy) == before


def test_export_to_hf_and_cached_dataset_refuse_save_over_their_source(model_copy, dataset, tmp_path):
    mcore = tmp_path / "mcore"
    _ok(run_megatron(["export", "--model", str(model_copy), "--to_mcore", "true", "--save", str(mcore)]))
    before = _snapshot(mcore)
    proc = run_cli(["export", "--load", str(mcore), "--to_hf", "true", "--save", str(mcore), "--overwrite", "true"])
    _failed_in_one_line(proc, "--save", "--load")
    assert _snapshot(mcore) == before
    before = _snapshot(model_copy)
    proc = run_cli(["export", "--model", str(model_copy), "--to_cached_dataset", "true", "--dataset", dataset,
                         "--save", str(model_copy), "--overwrite", "true"])
    _failed_in_one_line(proc, "--save", "--model")
    assert _snapshot(model_copy) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_training_refuses_save_in_its_model(where, model_copy, dataset):
    before = _snapshot(model_copy)
    save = model_copy if where == "same" else model_copy / "run"
    _failed_in_one_line(run_cli(_sft_args(model_copy, dataset, save)), "--save", "--model")
    assert _snapshot(model_copy) == before


def test_save_on_a_file_or_unwritable_place_fails_in_one_line(model_dir, dataset, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    proc = run_cli(["export", "--model", str(model_dir), "--to_mcore", "true", "--save", str(afile),
                         "--overwrite", "true"])
    _failed_in_one_line(proc, "--save", "not a directory")
    _failed_in_one_line(run_cli(_sft_args(model_dir, dataset, afile)), "--save", "not a directory")
    assert afile.read_text() == "keep me"
    unwritable = "/proc/megaswift_test_out"  # not writable even for root
    proc = run_cli(["export", "--model", str(model_dir), "--to_mcore", "true", "--save", unwritable])
    _failed_in_one_line(proc, "--save", "/proc")
    _failed_in_one_line(run_cli(_sft_args(model_dir, dataset, unwritable)), "--save", "/proc")


# 3. Stopping a run from the outside: it saves within an iteration and exits 0

def _env(nproc: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "NPROC_PER_NODE": str(nproc)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _wait_for_log_lines(proc, log: Path, n: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"loss"') >= n:  # n iterations logged
            return
        time.sleep(0.1)
    raise AssertionError(f"{log} did not log {n} iterations (exit code {proc.poll()})")


def _kill_all(procs) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_sigterm_to_the_launcher_stops_all_workers_with_a_checkpoint(model_dir, dataset, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megaswift.cli", *_sft_args(model_dir, dataset, save, 50)],
                            env=_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    family = []
    try:
        _wait_for_log_lines(proc, save / "logging.jsonl", 2)
        family = psutil.Process(proc.pid).children(recursive=True)
        assert len(family) >= 3  # torchrun and its two workers
        os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as `kill <pid>` or a scheduler does
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        it = int((save / TRACKER).read_text())
        assert 2 <= it < 50 and "SIGTERM" in err, err[-3000:]
        _, alive = psutil.wait_procs(family, timeout=5)
        assert not alive, f"left running: {alive}"
    finally:
        _kill_all([*family, psutil.Process(proc.pid)] if proc.poll() is None else family)
        proc.wait()


def test_sigint_saves_and_exits_cleanly(model_dir, dataset, tmp_path):
    save = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "megaswift.cli", *_sft_args(model_dir, dataset, save, 50)],
                            env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_log_lines(proc, save / "logging.jsonl", 2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    it = int((save / TRACKER).read_text())
    assert 2 <= it < 50 and "SIGINT" in err


def test_sigterm_without_save_saves_to_megatron_output(model_dir, dataset, tmp_path):
    """Megatron-SWIFT never runs with "nothing saved": without --save a run saves into
    megatron_output/<model directory name>/vN-<timestamp> under the working directory."""
    proc = subprocess.Popen([sys.executable, "-m", "megaswift.cli",
                             *_sft_args(model_dir, dataset, None, 50, "--log_interval", "1", "--add_version", "true")],
                            env={**_env(1), "PYTHONPATH": str(Path(__file__).parents[1])}, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[2/50"):
                proc.send_signal(signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines) + err
    assert proc.returncode == 0, err[-3000:]
    assert "with a checkpoint" in err, err[-3000:]
    runs = list((tmp_path / "megatron_output" / model_dir.name).iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("v0-"), runs
    assert 2 <= int((runs[0] / TRACKER).read_text()) < 50


# 4. Errors found before training leave no run directory

@pytest.fixture(scope="module")
def foreign_checkpoint(model_dir, tmp_path_factory):
    """A checkpoint whose weights belong to another model (a tiny qwen3) while its args.json and
    hf_config/ describe `model_dir`, as when a run directory's metadata is copied over."""
    root = tmp_path_factory.mktemp("foreign")
    other = make_tiny_model("qwen3", root / "qwen3")
    ckpt = root / "ckpt"
    _ok(run_megatron(["export", "--model", str(other), "--to_mcore", "true", "--save", str(ckpt)]))
    ours = root / "ours"
    _ok(run_megatron(["export", "--model", str(model_dir), "--to_mcore", "true", "--save", str(ours)]))
    shutil.rmtree(ckpt / "hf_config")
    shutil.copytree(ours / "hf_config", ckpt / "hf_config")
    shutil.copy(ours / "args.json", ckpt / "args.json")
    return ckpt


@pytest.mark.parametrize("case", ["truncated_weights", "lr_nan", "train_iters_0", "negative_lr",
                                  "foreign_checkpoint", "foreign_checkpoint_versioned"])
def test_errors_before_training_leave_no_run_directory(case, model_dir, dataset, tmp_path, request):
    save = tmp_path / "out" / "run"
    model = model_dir
    if case == "truncated_weights":
        model = tmp_path / "model"
        shutil.copytree(model_dir, model)
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    args = _sft_args(model, dataset, save)
    want = {"truncated_weights": ("model.safetensors", "corrupt"), "lr_nan": ("--lr nan",),
            "negative_lr": ("--lr -0.1",), "train_iters_0": ("--train_iters 0", ">= 1"),
            "foreign_checkpoint": ("another model", "(4, 64, 96)", "(4, 64, 64)"),
            "foreign_checkpoint_versioned": ("another model",)}[case]
    if case == "lr_nan":
        args[args.index("--lr") + 1] = "nan"
    elif case == "negative_lr":
        args[args.index("--lr") + 1] = "-0.1"
    elif case == "train_iters_0":
        args[args.index("--train_iters") + 1] = "0"
    elif case.startswith("foreign_checkpoint"):
        args = _resume_args(args, request.getfixturevalue("foreign_checkpoint"))
        if case.endswith("versioned"):
            args[args.index("--add_version") + 1] = "true"
    run = run_megatron if case.startswith("foreign") else run_cli  # those fail at the load
    _failed_in_one_line(run(args), *want)
    assert not (tmp_path / "out").exists()


# 5. A --save that holds a run is resumed with --load, never overwritten

def test_training_refuses_a_save_that_holds_a_run(model_dir, dataset, tmp_path):
    run = tmp_path / "run"
    _ok(run_megatron(_sft_args(model_dir, dataset, run, 1)))
    before = _snapshot(run)
    err = _failed_in_one_line(run_cli(_sft_args(model_dir, dataset, run, 2)), f"--load {run}",
                              "--add_version true")
    assert "--save" in err
    assert _snapshot(run) == before


def test_add_version_makes_a_new_run_directory_each_time(model_dir, dataset, tmp_path):
    root = tmp_path / "runs"
    for _ in range(2):
        args = _sft_args(model_dir, dataset, root, 1)
        args[args.index("--add_version") + 1] = "true"
        _ok(run_megatron(args))
    runs = sorted(p.name for p in root.iterdir())
    assert len(runs) == 2 and runs[0].startswith("v0-") and runs[1].startswith("v1-"), runs
    assert all(sorted(_losses(root / r)) == [1] for r in runs)


# 6. Unsupported or unreadable models and impossible pipeline sizes, in megaswift's words

def test_unknown_model_type_lists_the_supported_families(model_copy, dataset, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba_x"}))
    for proc in (run_cli(_sft_args(model_copy, dataset, tmp_path / "run")),
                 run_cli(["export", "--model", str(model_copy), "--to_mcore", "true",
                               "--save", str(tmp_path / "out")])):
        _failed_in_one_line(proc, "'mamba_x'", "not supported", "llama", "qwen3", "config.json")
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_config_that_is_not_json_names_the_file(model_copy, dataset, tmp_path):
    (model_copy / "config.json").write_text('{"model_type": "llama",')
    for proc in (run_cli(_sft_args(model_copy, dataset, tmp_path / "run")),
                 run_cli(["export", "--model", str(model_copy), "--to_mcore", "true",
                               "--save", str(tmp_path / "out")])):
        _failed_in_one_line(proc, str(model_copy / "config.json"), "not valid JSON")


def test_pipeline_larger_than_the_model_names_the_sizes_that_work(model_dir, dataset, tmp_path):
    proc = run_cli(_sft_args(model_dir, dataset, tmp_path / "run", 2, "--pipeline_model_parallel_size", "8"))
    _failed_in_one_line(proc, "exceeds the model's 4 layers", "--pipeline_model_parallel_size 1, 2 or 4")
    assert not (tmp_path / "run").exists()
