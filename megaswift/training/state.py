"""Training checkpoints: model, distributed optimizer, LR schedule, RNG and the data position.

The data position is the iteration itself (see `training/batches.py`), so restoring the iteration
restores the next batch. The distributed optimizer is saved 'dp_reshardable'. RNG states go to
one small file per rank (`rng/rank_N.pt`, tensors only, read back with weights_only=True).
Every read goes through `checkpointing.load_state` / `load_common` / `safe_load.torch_load`, so a
checkpoint's pickles run no code and a damaged file is named.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megaswift.checkpointing import (load_common, load_model_states, load_state, model_state_dict, per_layer, resolve,
                                     save_state)
from megaswift.runtime import megatron_fixes
from megaswift.runtime.context import current as current_runtime
from megaswift.runtime.safe_load import torch_load

_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(chunks, optimizer, scheduler, with_optimizer: bool, loading: bool,
                   trainable_only: bool = False) -> dict:
    state = model_state_dict(chunks, trainable_only)
    if with_optimizer:
        # A partly frozen model has optimizer state for some layers only: key it per layer.
        frozen = any(not p.requires_grad for c in chunks for p in c.parameters())
        view = per_layer(state) if frozen else state
        state["optimizer"] = optimizer.sharded_state_dict(view, is_loading=loading, metadata=_OPT_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save_training_state(root: Path, iteration: int, chunks, optimizer, scheduler, *,
                        save_optim: bool, save_rng: bool, trainable_only: bool = False, method=None) -> Path:
    """Every rank calls it; the tracker is written last, after all ranks finished.

    `trainable_only` (LoRA): the model part holds the adapters (and modules_to_save) only.
    """
    state = _sharded_state(chunks, optimizer, scheduler, save_optim, loading=False, trainable_only=trainable_only)
    state["has_optimizer"] = save_optim
    if hasattr(method, "state_dict"):  # a training method's own running state (DPO's bco_pair mean)
        state["method_state"] = method.state_dict()

    def save_rng_state(ckpt: Path) -> None:  # before the tracker: a checkpoint is complete or invisible
        (ckpt / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), ckpt / "rng" / f"rank_{dist.get_rank()}.pt")

    return save_state(state, root, iteration, extra=save_rng_state if save_rng else None)


def has_optimizer_state(root: Path) -> bool:
    common = load_common(resolve(root))
    return bool(common.get("has_optimizer", False))


@torch.no_grad()
def load_training_state(root: Path, chunks, optimizer, scheduler, trainable_only: bool = False, method=None,
                        load_optim: bool = True, load_rng: bool = True) -> int:
    """Restore model (all of it, or its trainable part), optimizer, schedule and RNG; returns the
    iteration to continue from.

    `load_optim` False (--no_load_optim): the optimizer keeps its fresh state (its fp32 main weights
    are refreshed from the loaded model), while the iteration and the LR schedule resume.
    `load_rng` False (--no_load_rng): this process's RNG streams are left as seeded.
    """
    ckpt = resolve(root)
    if load_optim:
        megatron_fixes.before_optimizer_load(optimizer)
        request = _sharded_state(chunks, optimizer, scheduler, True, loading=True, trainable_only=trainable_only)
    else:
        request = model_state_dict(chunks, trainable_only)  # the schedule is in the common state
    loaded = load_state(request, ckpt)
    load_model_states(chunks, loaded, trainable_only)
    if load_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        megatron_fixes.after_optimizer_load(optimizer, loaded["optimizer"])
    else:
        optimizer.reload_model_params()  # mixed precision: main weights are copies made at construction
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if hasattr(method, "load_state_dict"):
        method.load_state_dict(loaded.get("method_state") or {})
    rng_file = ckpt / "rng" / f"rank_{dist.get_rank()}.pt"
    if load_rng and rng_file.exists():
        _set_rng_state(torch_load(rng_file, rng_file))
    return int(loaded["iteration"])


def _rng_state() -> dict:
    tracker = tensor_parallel.get_cuda_rng_tracker()
    py = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if current_runtime().cuda else torch.empty(0, dtype=torch.uint8),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np.random.get_state()[2]]),
        "python": torch.tensor(py[1], dtype=torch.int64),
        "tracker": tracker.get_states(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if current_runtime().cuda and state["cuda"].numel():
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"][0]), 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
