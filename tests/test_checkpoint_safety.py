"""Loading a checkpoint runs no code from it, and a damaged one fails with one line naming the file.

A planted `__reduce__` (here: `exec` writing a marker file) in any pickle of a torch_dist
checkpoint, `.metadata`, `common.pt` or an object entry inside a `.distcp` shard, must be refused
by `megatron export --load` and `megatron sft --load` before it runs. Without
megaswift/runtime/safe_load.py the marker is written for `.metadata` and shard entries (plain
pickle / weights_only=False in torch.distributed.checkpoint) and for `common.pt` under
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_bitwise_equal, read_safetensors_dir, run_megatron
from megaswift.assets import fetch_llamafactory_data, fetch_smollm2
from tiny_models import make_tiny_model

TRACKER = "latest_checkpointed_iteration.txt"


class Payload:
    """Unpickling this runs `exec`, which creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    # with a tokenizer, so that `megatron sft --load` of the exported checkpoint can train
    return make_tiny_model("llama", tmp_path_factory.mktemp("hf"), tokenizer_dir=fetch_smollm2())


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "mc"
    proc = run_megatron(["export", "--model", str(hf_model), "--to_mcore", "true", "--save", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(checkpoint: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint, root)
    return root, root / "release"


def _to_hf(root: Path, out: Path):
    return run_megatron(["export", "--load", str(root), "--to_hf", "true", "--save", str(out)])


def _assert_refused(proc, out: Path, *phrases: str) -> None:
    assert proc.returncode != 0
    for p in phrases:
        assert p in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len([ln for ln in proc.stderr.splitlines() if "error:" in ln]) == 1, proc.stderr[-3000:]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def _plant(ckpt: Path, where: str, marker: Path) -> Path:
    """Put the payload into `where` of the iteration dir `ckpt`; returns the file that holds it."""
    from torch.distributed.checkpoint import FileSystemReader

    if where == "metadata":
        (ckpt / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        return ckpt / ".metadata"
    if where == "common":
        torch.save({"iteration": 0, "x": Payload(marker)}, ckpt / "common.pt")
        return ckpt / "common.pt"
    # every `_extra_state` object entry now points at a torch.save of the payload
    md = FileSystemReader(str(ckpt)).read_metadata()  # the test's own, trusted checkpoint
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    (ckpt / "evil.distcp").write_bytes(buf.getvalue())
    for index, info in md.storage_data.items():
        if "_extra_state" in index.fqn:
            info.relative_path, info.offset, info.length = "evil.distcp", 0, len(buf.getvalue())
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    return ckpt / "evil.distcp"


# -- restricted unpickling, in process -------------------------------------------------------


def test_metadata_unpickler_refuses_payload_and_reads_metadata(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    from megaswift.converters.hf_io import CheckpointError
    from megaswift.runtime.safe_load import unpickle_metadata

    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match=r"x/\.metadata holds a disallowed object builtins\.exec"):
        unpickle_metadata(io.BytesIO(pickle.dumps(Payload(marker))), "x/.metadata")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"disallowed object os\.system"):
        unpickle_metadata(io.BytesIO(b"cos\nsystem\n(S'true'\ntR."), "x/.metadata")  # protocol 0
    with pytest.raises(CheckpointError, match=r"x/\.metadata is damaged"):
        unpickle_metadata(io.BytesIO(pickle.dumps(Metadata({}))[:20]), "x/.metadata")

    size = torch.Size([4, 2])
    md = Metadata(
        state_dict_metadata={
            "w": TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), size,
                                       [ChunkStorageMetadata(torch.Size([0, 0]), size)]),
            "obj": BytesStorageMetadata()},
        storage_data={MetadataIndex("w", torch.Size([0, 0])): _StorageInfo("__0_0.distcp", 0, 10)})
    back = unpickle_metadata(io.BytesIO(pickle.dumps(md)), "x/.metadata")
    assert back.state_dict_metadata["w"].properties.dtype == torch.bfloat16
    assert back.state_dict_metadata["w"].size == size


def test_torch_load_admits_only_torch_own_types(tmp_path, monkeypatch):
    import argparse

    import megatron.core  # noqa: F401  (registers its safe globals, argparse.Namespace among them)

    from megaswift.converters.hf_io import CheckpointError
    from megaswift.runtime.safe_load import torch_load

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not lift weights_only
    marker = tmp_path / "marker"
    torch.save({"x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt holds a disallowed object builtins\.exec"):
        torch_load(tmp_path / "evil.pt", tmp_path / "evil.pt")
    assert not marker.exists()

    registered = torch.serialization.get_safe_globals()
    assert argparse.Namespace in registered
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "ns.pt")
    with pytest.raises(CheckpointError, match=r"disallowed object argparse\.Namespace"):
        torch_load(tmp_path / "ns.pt", tmp_path / "ns.pt")
    assert set(torch.serialization.get_safe_globals()) == set(registered)  # restored

    state = {"iteration": 3, "t": torch.arange(4), "groups": [{"betas": (0.9, 0.95)}],
             "layout": {(torch.float32, torch.bfloat16): [7]}}
    torch.save(state, tmp_path / "ok.pt")
    loaded = torch_load(tmp_path / "ok.pt", "ok.pt")
    assert loaded["groups"] == state["groups"] and torch.equal(loaded["t"], state["t"])
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"cut\.pt is damaged"):
        torch_load(tmp_path / "cut.pt", tmp_path / "cut.pt")


def test_restricted_unpickling_restores_the_readers(tmp_path):
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
    from torch.distributed.checkpoint import default_planner, filesystem

    from megaswift.converters.hf_io import CheckpointError
    from megaswift.runtime.safe_load import restricted_unpickling

    before = (filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes, TorchCommonLoadStrategy.load_common)
    marker = tmp_path / "marker"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="builtins.exec"):
        with restricted_unpickling(tmp_path):
            assert filesystem.pickle is not pickle
            filesystem.FileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()
    assert before == (filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes,
                      TorchCommonLoadStrategy.load_common)


# -- planted payloads through the real CLI ---------------------------------------------------


def test_genuine_checkpoint_loads(checkpoint, hf_model, tmp_path):
    """The control: the same checkpoint, untouched, converts back bitwise."""
    proc = _to_hf(checkpoint, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bitwise_equal(read_safetensors_dir(hf_model), read_safetensors_dir(tmp_path / "hf"))


@pytest.mark.parametrize("where", ["metadata", "common", "bytes"])
def test_export_refuses_planted_payload(where, checkpoint, tmp_path, monkeypatch):
    # common.pt is read weights-only by torch's default, unless this is set: not for megaswift
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    root, ckpt = _copy(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    holder = _plant(ckpt, where, marker)
    out = tmp_path / "out"
    proc = _to_hf(root, out)
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_refused(proc, out, str(holder), "disallowed object builtins.exec", "will not be loaded")


@pytest.mark.parametrize("where", ["metadata", "bytes"])
def test_sft_refuses_planted_payload(where, checkpoint, tmp_path):
    root, ckpt = _copy(checkpoint, tmp_path)
    marker = tmp_path / "marker"
    holder = _plant(ckpt, where, marker)
    save = tmp_path / "run"
    proc = run_megatron(["sft", "--load", str(root), "--dataset",
                         str(fetch_llamafactory_data() / "alpaca_en_demo.json") + "#16", "--save", str(save),
                         "--train_iters", "1", "--global_batch_size", "2", "--micro_batch_size", "2",
                         "--lr", "1e-4", "--max_length", "256", "--add_version", "false"])
    assert not marker.exists(), "the checkpoint's payload ran"
    _assert_refused(proc, save, str(holder), "disallowed object builtins.exec")


# -- damaged checkpoints ---------------------------------------------------------------------


def test_truncated_shard(checkpoint, tmp_path):
    root, ckpt = _copy(checkpoint, tmp_path)
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # an interrupted copy
    out = tmp_path / "out"
    _assert_refused(_to_hf(root, out), out, f"{shard} is damaged (truncated: 100 bytes",
                    "re-save the checkpoint or load an earlier iteration")


def test_garbage_tracker(checkpoint, tmp_path):
    root, _ = _copy(checkpoint, tmp_path)
    (root / TRACKER).write_bytes(b"\x00\x17garbage")
    out = tmp_path / "out"
    _assert_refused(_to_hf(root, out), out, f"{root / TRACKER} is damaged: it holds",
                    "garbage", "not an iteration number", f"{root} holds release")


def test_tracker_names_missing_iteration(checkpoint, tmp_path):
    root, ckpt = _copy(checkpoint, tmp_path)
    for it in (2, 4):
        shutil.copytree(ckpt, root / f"iter_{it:07d}")
    shutil.rmtree(ckpt)
    (root / TRACKER).write_text("7")
    out = tmp_path / "out"
    _assert_refused(_to_hf(root, out), out, f"{root / TRACKER} names iteration 7, but {root / 'iter_0000007'} "
                    "does not exist", "holds iter_0000002, iter_0000004")
