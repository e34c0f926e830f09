"""Where megatron-core assumes CUDA, and what makes it run on CPU with gloo. Inert with CUDA.

Every adaptation is listed in `ADAPTATIONS` with the call site it serves, and
`tests/test_cpu_compat.py` checks each one is still needed (the unpatched call fails on CPU) and
sufficient (the patched call works) against the installed megatron-core.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

ADAPTATIONS: dict[str, str] = {}
_applied = False


def adaptation(site: str):
    """Register a patch function under the megatron-core call site it serves."""
    def deco(fn):
        ADAPTATIONS[fn.__name__] = site
        return fn
    return deco


class CPURNGStatesTracker:
    """CPU stand-in for `tensor_parallel.random.CudaRNGStatesTracker` (add / fork / states)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_CPU_TRACKER = CPURNGStatesTracker()


@adaptation("tensor_parallel/random.py: get_cuda_rng_tracker / model_parallel_cuda_manual_seed "
            "(torch.cuda RNG states; used by dropout, init under TP and full recompute)")
def patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    def get_tracker(*args, **kwargs):
        return _CPU_TRACKER

    def manual_seed(seed: int, *args, **kwargs):
        from megatron.core import parallel_state

        _CPU_TRACKER.reset()
        torch.manual_seed(seed)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        _CPU_TRACKER.add("model-parallel-rng", seed + 2718 + tp_rank)
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        etp_rank = parallel_state.get_expert_tensor_parallel_rank()
        _CPU_TRACKER.add("expert-parallel-rng", seed + 2718 + 100 * ep_rank + etp_rank + 1)
        _CPU_TRACKER.add("data-parallel-rng", seed)

    tp_random.get_cuda_rng_tracker = get_tracker
    tp_random.model_parallel_cuda_manual_seed = manual_seed
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    import megatron.core.tensor_parallel as tp

    tp.get_cuda_rng_tracker = get_tracker
    tp.model_parallel_cuda_manual_seed = manual_seed


@adaptation("dist_checkpointing/strategies/filesystem_async.py preload_tensors, "
            "distributed/param_and_grad_buffer.py: torch.cuda.synchronize() (nothing to wait for on CPU)")
def patch_cuda_synchronize() -> None:
    torch.cuda.synchronize = lambda *args, **kwargs: None


@adaptation("dist_checkpointing/strategies/state_dict_saver.py save finalize, "
            "distributed/param_and_grad_buffer.py: device=torch.cuda.current_device()")
def patch_current_device() -> None:
    torch.cuda.current_device = lambda: "cpu"


@adaptation("models/common/language_module/language_module.py setup_embeddings_and_output_layer "
            "(tied embeddings under PP), distributed/param_and_grad_buffer.py: Tensor.cuda()")
def patch_tensor_cuda() -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "as_tensor")


class _CPUCuda:
    """`torch.cuda` as seen by a proxied megatron module: streams and events that do nothing."""

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def wait(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

        def query(self):
            return True

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CPUCuda.Stream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CPUTorch:
    """`torch` for one megatron module: factory calls with device="cuda" land on the CPU."""

    cuda = _CPUCuda()

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and "cuda" in str(dev):
                    kwargs["device"] = "cpu"
                if kwargs.get("pin_memory"):  # needs an accelerator's pinned allocator
                    kwargs["pin_memory"] = False
                return __f(*args, **kwargs)
            return factory
        return attr


_PROXIED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.utils",
)


@adaptation("pipeline_parallel/schedules.py total_num_tokens, optimizer/{clip_grads,optimizer,"
            "grad_scaler}.py, distributed/param_and_grad_buffer.py, utils.py: "
            "torch.zeros/tensor(..., device='cuda'); distributed_data_parallel.py torch.cuda.Stream")
def patch_cuda_device_literals() -> None:
    import importlib

    for name in _PROXIED_MODULES:
        importlib.import_module(name).torch = _CPUTorch()


@adaptation("optimizer/distrib_optimizer.py, optimizer/optimizer.py, optimizer/clip_grads.py: "
            "param.type() == 'torch.cuda.FloatTensor' checks")
def patch_tensor_type() -> None:
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


@adaptation("models/common/embeddings/rope_utils.py get_pos_emb_on_this_cp_rank: "
            "torch.tensor(..., pin_memory=True) (context-parallel RoPE split)")
def patch_pinned_memory() -> None:
    from megatron.core.models.common.embeddings import rope_utils

    rope_utils.torch = _CPUTorch()


def _tagged_batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next, tensor_recv_next,
                            group, prev_pipeline_rank, next_pipeline_rank):
    """megatron's `_batched_p2p_ops` with one tag per direction.

    NCCL matches a batch's sends and receives per peer in posting order; gloo matches by (peer,
    tag). With two pipeline ranks the previous and the next rank are the same peer, and the
    interleaved schedule batches an activation and a gradient to it: untagged, gloo paired the
    activation with the gradient receive (same shape: silently wrong losses).
    """
    fwd, bwd = 1, 2  # activations travel to the next stage, gradients to the previous one
    specs = [(dist.isend, tensor_send_prev, prev_pipeline_rank, bwd),
             (dist.irecv, tensor_recv_prev, prev_pipeline_rank, fwd),
             (dist.isend, tensor_send_next, next_pipeline_rank, fwd),
             (dist.irecv, tensor_recv_next, next_pipeline_rank, bwd)]
    ops = [dist.P2POp(op, t, peer, group, tag) for op, t, peer, tag in specs if t is not None]
    return dist.batch_isend_irecv(ops) if ops else []


@adaptation("pipeline_parallel/p2p_communication.py _batched_p2p_ops: untagged isend/irecv pairs "
            "(gloo matches by tag; interleaved pipeline with 2 ranks)")
def patch_p2p_tags() -> None:
    from megatron.core.pipeline_parallel import p2p_communication

    p2p_communication._batched_p2p_ops = _tagged_batched_p2p_ops


def sum_of_squares(tensor: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """sum(tensor**2) in float64, accurate to ~1e-7 relative at any size, as fast as torch.norm.

    torch's CPU float32 `norm` loses precision on large tensors (0.8% on 50M N(0,1) values, 7.6e-4
    on a 3M-element embedding gradient): each 2048-element chunk is normed in float32, the
    partial sums are added in float64.
    """
    flat = tensor.detach().reshape(-1)
    n = flat.numel() // chunk * chunk
    total = torch.linalg.vector_norm(flat[:n].view(-1, chunk).float(), dim=1).double().pow(2).sum()
    if n < flat.numel():
        total = total + flat[n:].double().pow(2).sum()
    return total


def _accurate_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for megatron's `local_multi_tensor_l2_norm` (the no-apex fallback, [norm], None)."""
    total = sum((sum_of_squares(t) for t in tensor_lists[0]), torch.zeros((), dtype=torch.float64))
    return total.sqrt().float().reshape(1), None


@adaptation("optimizer/clip_grads.py get_grad_norm_fp32 via utils.local_multi_tensor_l2_norm: "
            "torch.norm(tensor) in float32 (inaccurate on CPU for large tensors: wrong grad norm "
            "and clipping, and a different norm for each TP layout)")
def patch_l2_norm() -> None:
    from megatron.core.optimizer import clip_grads

    clip_grads.l2_norm_impl = _accurate_l2_norm


def apply() -> None:
    """Apply every CPU adaptation once; does nothing when CUDA is available."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    for name in ADAPTATIONS:
        globals()[name]()
    _applied = True
