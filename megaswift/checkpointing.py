"""megatron-core distributed checkpoints (torch_dist) in Megatron-LM's directory layout.

    <dir>/latest_checkpointed_iteration.txt   "release" or the iteration number; written last
    <dir>/release/ or <dir>/iter_0000100/     the torch_dist checkpoint (reshardable over TP/PP)
    <dir>/args.json                           how the checkpoint was made (model, layout, dtype)
    <dir>/hf_config/                          the HF config, generation config and tokenizer

A checkpoint directory only becomes visible through the tracker, written after every rank has
finished, so a crash during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.distributed as dist
from megatron.core import dist_checkpointing

from megaswift.converters.hf_io import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
ARGS = "args.json"
HF_CONFIG = "hf_config"


def iteration_dir(root: Path, iteration: int | str) -> Path:
    return root / ("release" if iteration == "release" else f"iter_{int(iteration):07d}")


def model_state_dict(models) -> dict:
    """Megatron-LM's keys: `model` for one chunk, `model0`, `model1` ... for virtual stages."""
    if len(models) == 1:
        return {"model": models[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)}


def save_models(models, root: Path, iteration: int | str = "release", extra: dict | None = None) -> Path:
    """Save this rank's chunks into `root`; every rank calls it. Returns the iteration dir."""
    state = model_state_dict(models)
    state.update(extra or {})
    return save_state(state, root, iteration)


def save_state(state: dict, root: Path, iteration: int | str, extra=None) -> Path:
    """dist_checkpointing.save of `state` into root/<iteration dir>, then `extra(ckpt_dir)` on
    every rank (files of its own), then the tracker (last)."""
    ckpt = iteration_dir(root, iteration)
    if _rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = {**state, "checkpoint_version": 3.0,
             "iteration": 0 if iteration == "release" else int(iteration)}
    dist_checkpointing.save(state, str(ckpt))  # into an empty dir, as it expects
    if extra is not None:
        extra(ckpt)
    _barrier()
    if _rank() == 0:
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, root / TRACKER)
    _barrier()
    return ckpt


def resolve(root: Path) -> Path:
    """The iteration directory the tracker of `root` points at, or a clear error."""
    tracker = root / TRACKER
    if not tracker.exists():
        raise CheckpointError(f"{root} is not a megatron checkpoint: {TRACKER} is missing "
                              "(was the save interrupted? pass a directory written by "
                              "`megatron export --to_mcore` or a training run)")
    ckpt = iteration_dir(root, tracker.read_text().strip())
    if not (ckpt / "metadata.json").exists():
        raise CheckpointError(f"{ckpt} named by {tracker} is not a complete torch_dist checkpoint")
    return ckpt


def load_models(models, root: Path) -> None:
    """Load this rank's chunks from `root` at whatever TP/PP it was saved with."""
    ckpt = resolve(root)
    loaded = dist_checkpointing.load(model_state_dict(models), str(ckpt))
    if len(models) == 1:
        models[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(loaded[f"model{i}"], strict=True)


def read_args(root: Path) -> dict:
    path = root / ARGS
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {root} was not written by megaswift; "
                              "re-export it with `megatron export --to_mcore`")
    return json.loads(path.read_text())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
