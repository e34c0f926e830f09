"""Shared fixtures: tiny HF models per family, and running `megatron` in-process or under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, make_tiny_model  # noqa: E402,F401  (FAMILIES re-exported to tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def data_args(**kw):
    """DataArgs for the data-pipeline tests: no validation rows held out unless asked for (the flag's
    default, Megatron-SWIFT's 0.01, would take one row of each small test file)."""
    from megaswift.args.data import DataArgs

    return DataArgs(**{"split_dataset_ratio": 0.0, **kw})


def tiered(ids, slow) -> list:
    """Parameter ids for a layout/option matrix: those in ``slow`` are marked `slow` (run by
    ``bash scripts/test.sh --full``); the rest, one representative per parallelism dimension, run in CI."""
    unknown = set(slow) - set(ids)
    assert not unknown, f"slow ids not in the matrix: {unknown}"
    return [pytest.param(i, marks=pytest.mark.slow) if i in slow else i for i in ids]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = make_tiny_model(name, tmp_path_factory.mktemp(f"hf-{name}"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random llama with SmolLM2's real tokenizer (and chat template): the training tests' model."""
    from megaswift.assets import fetch_smollm2

    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-tok"), tokenizer_dir=fetch_smollm2())


@pytest.fixture(scope="session")
def dataset():
    """48 rows of LLaMA-Factory's alpaca demo data."""
    from megaswift.assets import fetch_llamafactory_data

    return str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#48"


def run_megatron(args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real `megatron` CLI (torchrun underneath when nproc > 1); output captured."""
    env = {**os.environ, "NPROC_PER_NODE": str(nproc), "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "megaswift.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def logged(save: Path, key: str = "loss") -> dict[int, float]:
    """{iteration: value} of `key` from a run's logging.jsonl."""
    import json

    out = {}
    for line in (Path(save) / "logging.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if key in rec:
            out[rec["iteration"]] = rec[key]
    return out


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`megatron <args>` in this process, output captured: for runs that must fail before any work.

    The same `main()` the console script runs, without a new interpreter importing megatron-core
    and transformers again (~10 s per case on CI's CPU). One process, no torchrun.
    """
    import contextlib
    import io
    import traceback
    from unittest import mock

    from megaswift import cli

    def no_process_group(*_a, **_k):
        raise AssertionError("run_cli is for failures before any process group starts; use run_megatron")

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch("megaswift.training.trainer.init_distributed", no_process_group), \
            mock.patch("megaswift.commands.export.init_distributed", no_process_group):
        try:
            rc = cli.main(list(args))
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - a traceback is what the caller asserts against
            traceback.print_exc()
            rc = 1
    return subprocess.CompletedProcess(["megatron", *args], rc, out.getvalue(), err.getvalue())


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def precision_figures(output: str) -> dict[str, tuple[float, float]]:
    """{layout: (max_abs_diff, argmax_agreement)} from `--test_convert_precision` lines."""
    out = {}
    for m in re.finditer(r"\[precision\] (\w+)\s.*max_abs_diff=(\S+) argmax_agreement=(\S+)", output):
        out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b), f"key sets differ: {sorted(set(a) ^ set(b))[:10]}"
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"
