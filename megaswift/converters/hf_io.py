"""Reading and writing HF folders: lazy per-tensor safetensors reads, sharded atomic writes, side files."""

from __future__ import annotations

import json
from collections import OrderedDict
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """An HF or MCore checkpoint that cannot be used; the message names the file and the fix."""


# transformers 5's in-memory MoE layout, which some checkpoints are saved in: every expert of a
# layer in one 3-D tensor. The reader shows them as the per-expert tensors transformers writes.
_OPEN_FILES = 2
_FUSED_EXPERTS = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<part>gate_up_proj|down_proj)$")


class HFReader:
    """Lazy access to the tensors of an HF folder: a tensor is read only when asked for.

    Fused 3-D expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj`
    [E, H, I]) appear as the per-expert names (`mlp.experts.E.gate_proj.weight` ...), each read as
    its own slice of the file.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        # Open files, most recent last. Pages a memory map has touched count towards this process's
        # RSS until it is closed, so only the last few are kept: a rank reading its experts layer
        # by layer holds one file's pages at a time, not every file it has read.
        self._handles: OrderedDict[str, object] = OrderedDict()
        index = self.dir / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir} has no *.safetensors files (only safetensors "
                                      "weights are read; convert .bin checkpoints first)")
            weight_map = {}
            for f in files:
                for k in self._open(f.name).keys():
                    weight_map[k] = f.name
        self.weight_map: dict[str, str] = weight_map
        self._fused_files: dict[str, str] = {}
        self.virtual: dict[str, tuple[str, int, int | None]] = {}  # name -> (fused tensor, expert, gate/up half)
        for key in list(weight_map):
            m = _FUSED_EXPERTS.match(key)
            if not m:
                continue
            shape = self._open(weight_map[key]).get_slice(key).get_shape()
            if len(shape) != 3:
                continue
            for e in range(shape[0]):
                if m["part"] == "down_proj":
                    self.virtual[f"{m['prefix']}.{e}.down_proj.weight"] = (key, e, None)
                else:
                    self.virtual[f"{m['prefix']}.{e}.gate_proj.weight"] = (key, e, 0)
                    self.virtual[f"{m['prefix']}.{e}.up_proj.weight"] = (key, e, 1)
            self._fused_files[key] = weight_map.pop(key)

    def _open(self, fname: str):
        if fname in self._handles:
            self._handles.move_to_end(fname)
        else:
            while len(self._handles) >= _OPEN_FILES:
                self._handles.popitem(last=False)
            path = self.dir / fname
            try:
                self._handles[fname] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {path}: {e}; the file is missing or corrupt, "
                                      "re-download or re-export it") from e
        return self._handles[fname]

    def _expert_slice(self, key: str, expert: int, half: int | None) -> torch.Tensor:
        """Expert `expert`'s matrix of a fused tensor (`half` 0/1: gate/up rows of gate_up_proj)."""
        fname = self._fused_files[key]
        sl = self._open(fname).get_slice(key)
        if half is None:
            return sl[expert].contiguous()
        rows = sl.get_shape()[1] // 2
        return sl[expert, half * rows:(half + 1) * rows].contiguous()

    def close(self) -> None:
        """Drop the memory maps (their pages count towards this process's RSS)."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.weight_map) + list(self.virtual)

    def get(self, name: str) -> torch.Tensor:
        if name in self.virtual:
            return self._expert_slice(*self.virtual[name])
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from {self.dir}")
        fname = self.weight_map[name]
        try:
            return self._open(fname).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.dir / fname}: {e}; "
                                  "the file is corrupt, re-download or re-export it") from e


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1.5GiB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(text), re.I)
    if not m:
        raise ValueError(f"--max_shard_size {text!r}: use a size like 5GB or 500MB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[(m.group(2) or "").upper()])


class ShardedWriter:
    """Streams tensors into safetensors files of at most `max_shard_size` bytes.

    Files are written under temporary names; `finish()` (rank 0, after every writer is done)
    numbers them `model-0000i-of-0000N.safetensors` and writes the index.
    """

    def __init__(self, out_dir: Path, max_shard_size: int, tag: str = "0"):
        self.out_dir, self.max_bytes, self.tag = out_dir, max_shard_size, tag
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, dict[str, int]]] = []  # (temp file name, {tensor: bytes})

    def add(self, name: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        fname = f".part-{self.tag}-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out_dir / fname), metadata={"format": "pt"})
        self.files.append((fname, {k: v.numel() * v.element_size() for k, v in self.pending.items()}))
        self.pending, self.pending_bytes = {}, 0


def finish_shards(out_dir: Path, files: list[tuple[str, dict[str, int]]]) -> None:
    """Rename temp part files (in the given order) to HF's numbering and write the index."""
    n = len(files)
    weight_map, total = {}, 0
    for i, (tmp, tensors) in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / tmp, out_dir / final)
        for k, b in tensors.items():
            weight_map[k] = final
            total += b
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, generation config, tokenizer and chat template files (never weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if (f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and not f.name.startswith(".")
                and not f.name.endswith(".index.json")):
            target = dst / f.name
            if target.exists() and os.path.samefile(f, target):
                continue  # `--load X --save X` resumes into its own directory: already there
            shutil.copy2(f, target)
