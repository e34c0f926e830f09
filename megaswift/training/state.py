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

from megaswift.checkpointing import load_common, load_state, model_state_dict, resolve, save_state
from megaswift.runtime.context import current as current_runtime
from megaswift.runtime.safe_load import torch_load

_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _sharded_state(chunks, optimizer, scheduler, with_optimizer: bool, loading: bool) -> dict:
    state = model_state_dict(chunks)
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading, metadata=_OPT_METADATA)
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def save_training_state(root: Path, iteration: int, chunks, optimizer, scheduler, *,
                        save_optim: bool, save_rng: bool) -> Path:
    """Every rank calls it; the tracker is written last, after all ranks finished."""
    state = _sharded_state(chunks, optimizer, scheduler, save_optim, loading=False)
    state["has_optimizer"] = save_optim

    def save_rng_state(ckpt: Path) -> None:  # before the tracker: a checkpoint is complete or invisible
        (ckpt / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), ckpt / "rng" / f"rank_{dist.get_rank()}.pt")

    return save_state(state, root, iteration, extra=save_rng_state if save_rng else None)


def has_optimizer_state(root: Path) -> bool:
    common = load_common(resolve(root))
    return bool(common.get("has_optimizer", False))


def _allocate_optimizer_state(optimizer) -> None:
    """Give every parameter an (empty) Adam or SGD-momentum state before a load.

    megatron-core's distributed optimizer reads the step count from existing state when it
    builds the sharded state dict to load into (`distrib_optimizer.py` state_dict asserts one
    step value), and the loaded values overwrite these placeholders in place. For SGD
    megatron-core 0.16 has no state initialiser at all (`init_state_fn` is None, called on
    load): the momentum buffers allocated here stand in for it.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            fresh = lambda p: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),  # noqa: E731
                               "step": torch.tensor(0.0)}
        elif isinstance(inner, torch.optim.SGD):
            fresh = lambda p: ({"momentum_buffer": torch.zeros_like(p)}  # noqa: E731
                               if inner.defaults.get("momentum") else {})
            if getattr(opt, "init_state_fn", True) is None:
                opt.init_state_fn = lambda *_args, **_kw: None
        else:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st.update(fresh(p))


def _param_group_steps(tree) -> set[float]:
    """Every `param_groups[*].step` in a loaded optimizer state (one per sub-optimizer)."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "param_groups" and isinstance(v, list):
                found |= {float(g["step"]) for g in v if isinstance(g, dict) and g.get("step") is not None}
            elif k != "param_state":
                found |= _param_group_steps(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            found |= _param_group_steps(v)
    return found


def _restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Give every Adam state its own, correct `step` tensor after a load.

    megatron-core 0.16 (non-TE Adam) first sets one shared `step` tensor from the saved param
    groups, then overwrites it from the per-parameter state, which does not store the step (the
    placeholder 0 survives). torch's Adam would then restart bias correction, or with a shared
    tensor increment it once per parameter; either way a resumed run diverges.
    """
    steps = _param_group_steps(loaded_optimizer_state)
    if not steps:
        return
    if len(steps) != 1:
        raise RuntimeError(f"checkpoint optimizer has inconsistent step counts {sorted(steps)}")
    step = steps.pop()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


@torch.no_grad()
def load_training_state(root: Path, chunks, optimizer, scheduler) -> int:
    """Restore model, optimizer, schedule and RNG; returns the iteration to continue from."""
    ckpt = resolve(root)
    _allocate_optimizer_state(optimizer)
    loaded = load_state(_sharded_state(chunks, optimizer, scheduler, True, loading=True), ckpt)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    rng_file = ckpt / "rng" / f"rank_{dist.get_rank()}.pt"
    if rng_file.exists():
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
