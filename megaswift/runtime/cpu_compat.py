"""Where megatron-core needs help, in one registry: CPU adaptations and megatron-core version fixes.

Each adaptation is registered with `@adaptation(site, when=...)` under the megatron-core call site
it serves and what goes wrong there:

- `when=CPU` (this module): megatron-core assumes CUDA. `apply()` runs these once where there is
  no CUDA. They replace names inside megatron-core only: a megatron module's `torch` (a view of
  torch with CPU stand-ins for the names it needs, e.g. `torch.cuda.current_device`), or a
  megatron function. The two that need tensor methods (`Tensor.type`, `Tensor.cuda`) wrap the
  few megatron functions calling them, which swap the method in while they run and put torch's
  back when they return: transformers and user code only ever see plain torch.
- `when=BEFORE_OPTIMIZER_LOAD` / `AFTER_OPTIMIZER_LOAD` (`megatron_fixes.py`): wrong behaviour of
  a megatron-core version on any device; the checkpoint loader calls them through `run`.

Every patch goes through `_patch`, which records what it replaced, so `suspended(name)` runs
megatron-core without that adaptation: `tests/test_cpu_compat.py` runs each megatron call
unpatched (it fails, or is wrong, on CPU) and patched (it works) against the installed version.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

CPU = "cpu"                                      # applied once by `apply()` without CUDA
BEFORE_OPTIMIZER_LOAD = "before_optimizer_load"  # run(when, optimizer)
AFTER_OPTIMIZER_LOAD = "after_optimizer_load"    # run(when, optimizer, loaded optimizer state)


@dataclass
class Adaptation:
    site: str        # the megatron-core call site it serves, and what goes wrong there
    fn: Callable
    when: str
    patches: list = field(default_factory=list)  # (owner, name, original, replacement), once applied


ADAPTATIONS: dict[str, Adaptation] = {}
_MISSING = object()
_recording: list | None = None  # the patches of the adaptation being applied
_applied = False


def adaptation(site: str, when: str = CPU):
    """Register a function under the megatron-core call site it serves (see the module doc)."""
    def deco(fn):
        ADAPTATIONS[fn.__name__] = Adaptation(site, fn, when)
        return fn
    return deco


def run(when: str, *args) -> None:
    """Call every adaptation registered for `when` (not CPU) with `args`, in registration order."""
    for a in ADAPTATIONS.values():
        if a.when == when:
            a.fn(*args)


def _patch(owner, name: str, value) -> None:
    """`setattr(owner, name, value)`, recorded under the adaptation being applied."""
    if any(o is owner and n == name for a in ADAPTATIONS.values() for o, n, _, _ in a.patches):
        raise RuntimeError(f"{owner!r}.{name} is patched twice")  # `suspended` could not undo it
    _recording.append((owner, name, vars(owner).get(name, _MISSING), value))
    setattr(owner, name, value)


def _put(owner, name: str, value) -> None:
    if value is _MISSING:
        delattr(owner, name)
    else:
        setattr(owner, name, value)


@contextlib.contextmanager
def suspended(*names: str):
    """Run megatron-core without the named (applied) adaptations, then with them again."""
    patches = [p for n in names for p in ADAPTATIONS[n].patches]
    for owner, name, original, _ in reversed(patches):
        _put(owner, name, original)
    try:
        yield
    finally:
        for owner, name, _, value in patches:
            setattr(owner, name, value)


# -- the `torch` a megatron module sees --------------------------------------------------------

class _CudaView:
    """`torch.cuda` as one megatron module sees it: torch.cuda, but for names adaptations set here."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchView:
    """`torch` as one megatron module sees it: torch, but for names adaptations set here."""

    def __init__(self):
        self.cuda = _CudaView()

    def __getattr__(self, name):
        return getattr(torch, name)


def _torch_of(module_name: str) -> _TorchView:
    """The megatron module's `torch`, made a `_TorchView` (a pass-through until an adaptation sets
    a name on it, so it is not itself recorded)."""
    module = importlib.import_module(module_name)
    if not isinstance(module.torch, _TorchView):
        module.torch = _TorchView()
    return module.torch


def _nothing(*args, **kwargs) -> None:
    return None


def _cpu_device(*args, **kwargs) -> str:
    return "cpu"


def _tensor_method_within(method: str, replacement, callers) -> None:
    """While the megatron functions `callers` run, `torch.Tensor.<method>` is `replacement`; torch's
    own again when they return. Each caller is (module, qualname, *modules importing it by name)."""
    @contextlib.contextmanager
    def during():
        original = vars(torch.Tensor).get(method, _MISSING)
        setattr(torch.Tensor, method, replacement)
        try:
            yield
        finally:
            _put(torch.Tensor, method, original)

    for module_name, qualname, *importers in callers:
        *path, name = qualname.split(".")
        owner = functools.reduce(getattr, path, importlib.import_module(module_name))
        fn = vars(owner)[name]

        @functools.wraps(fn)
        def within(*args, __fn=fn, **kwargs):
            with during():
                return __fn(*args, **kwargs)

        _patch(owner, name, within)
        for imp in importers:
            _patch(importlib.import_module(imp), name, within)


# -- CPU adaptations ---------------------------------------------------------------------------

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

    import megatron.core.tensor_parallel as tp

    for owner in (tp_random, tp):
        _patch(owner, "get_cuda_rng_tracker", get_tracker)
        _patch(owner, "model_parallel_cuda_manual_seed", manual_seed)
    _patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))


# megatron modules whose `torch.cuda.synchronize()` waits for CUDA work (megatron-core 0.16.1)
_SYNCHRONIZE_CALLERS = (
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # preload_tensors: every save
    "megatron.core.pipeline_parallel.p2p_communication",  # after batched isend/irecv (batch_p2p_sync)
)


@adaptation("dist_checkpointing/strategies/filesystem_async.py FileSystemWriterAsync.preload_tensors, "
            "pipeline_parallel/p2p_communication.py P2PCommunicator._communicate(_shapes): "
            "torch.cuda.synchronize() (nothing to wait for on CPU)")
def patch_cuda_synchronize() -> None:
    for module in _SYNCHRONIZE_CALLERS:
        _patch(_torch_of(module).cuda, "synchronize", _nothing)


# megatron modules that allocate on `device=torch.cuda.current_device()` (megatron-core 0.16.1)
_CURRENT_DEVICE_CALLERS = (
    "megatron.core.distributed.param_and_grad_buffer",  # _ParamAndGradBuffer: param and grad buffers
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.tensor_parallel.layers",  # sequence-parallel all-gather buffer in backward
    "megatron.core.tensor_parallel.mappings",  # sequence-parallel gather / reduce-scatter outputs
    "megatron.core.tensor_parallel.utils",
    "megatron.core.utils",  # GlobalMemoryBuffer.get_tensor
    "megatron.core.pipeline_parallel.p2p_communication",  # shapes and receive buffers
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # RotaryEmbedding.get_emb
    "megatron.core.optimizer.optimizer",  # ChainedOptimizer.get_loss_scale
    "megatron.core.optimizer.distrib_optimizer",  # load_state_dict shards
    "megatron.core.optimizer.grad_scaler",  # DynamicGradScaler.load_state_dict (fp16 resume)
    "megatron.core.transformer.moe.router",  # TopKRouter.gating moves its weight; expert-bias buffers
    "megatron.core.transformer.moe.experts",  # SequentialMLP / TEGroupedMLP zero-token buffers
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # save_state_dict_async_finalize
)


@adaptation("distributed/param_and_grad_buffer.py _ParamAndGradBuffer, tensor_parallel/{layers,mappings}.py "
            "(sequence parallel), pipeline_parallel/p2p_communication.py, rotary_pos_embedding.py get_emb, "
            "dist_checkpointing/strategies/state_dict_saver.py save finalize, and the rest of "
            "_CURRENT_DEVICE_CALLERS: device=torch.cuda.current_device()")
def patch_current_device() -> None:
    for module in _CURRENT_DEVICE_CALLERS:
        _patch(_torch_of(module).cuda, "current_device", _cpu_device)


# megatron functions calling `.cuda()` on a tensor (megatron-core 0.16.1): (module, qualname, importers)
_TENSOR_CUDA_CALLERS = (
    ("megatron.core.models.common.language_module.language_module",  # tied embeddings under PP
     "LanguageModule.setup_embeddings_and_output_layer"),
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank",  # CP RoPE split
     "megatron.core.models.common.embeddings.rotary_pos_embedding",
     "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"),
    ("megatron.core.optimizer.grad_scaler", "DynamicGradScaler.load_state_dict"),  # fp16 resume
)


@adaptation("models/common/language_module/language_module.py setup_embeddings_and_output_layer "
            "(tied embeddings under PP), models/common/embeddings/rope_utils.py "
            "get_pos_emb_on_this_cp_rank (CP RoPE), optimizer/grad_scaler.py DynamicGradScaler."
            "load_state_dict (fp16 resume): Tensor.cuda()")
def patch_tensor_cuda() -> None:
    _tensor_method_within("cuda", lambda self, *args, **kwargs: self, _TENSOR_CUDA_CALLERS)


_TENSOR_TYPE = torch.Tensor.type


def _cuda_type_name(self, dtype=None, non_blocking=False, **kwargs):
    """`Tensor.type()` naming a CPU tensor as its CUDA type ('torch.cuda.FloatTensor')."""
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


# megatron functions checking `param.type() == 'torch.cuda.FloatTensor'` (megatron-core 0.16.1)
_TENSOR_TYPE_CALLERS = (
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),  # and its
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),  # param groups
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32", "megatron.core.optimizer.optimizer"),
)


@adaptation("optimizer/distrib_optimizer.py DistributedOptimizer.__init__ (and its "
            "_build_model_and_main_param_groups), optimizer/optimizer.py Float16OptimizerWithFloat16Params."
            "__init__, optimizer/clip_grads.py clip_grad_by_total_norm_fp32: "
            "param.type() == 'torch.cuda.FloatTensor' checks")
def patch_tensor_type() -> None:
    _tensor_method_within("type", _cuda_type_name, _TENSOR_TYPE_CALLERS)


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like",
              "empty_like", "full_like", "rand", "randn", "as_tensor")


def _on_cpu(factory):
    """`factory` with device="cuda" placed on the CPU and without pinned memory (that needs an
    accelerator's allocator)."""
    @functools.wraps(factory)
    def cpu_factory(*args, **kwargs):
        dev = kwargs.get("device")
        if dev is not None and "cuda" in str(dev):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return factory(*args, **kwargs)
    return cpu_factory


def _factories_on_cpu(view: _TorchView) -> None:
    for name in _FACTORIES:
        _patch(view, name, _on_cpu(getattr(torch, name)))


class _Stream:
    """A CUDA stream or event on the CPU: nothing to order or wait for."""

    def __init__(self, *args, **kwargs):
        pass

    wait_stream = record = wait = synchronize = wait_event = _nothing

    def record_event(self, *args, **kwargs):
        return _Stream()

    def query(self):
        return True


_DEVICE_LITERAL_CALLERS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.utils",
    "megatron.core.transformer.moe.token_dispatcher",  # MoEAlltoAllTokenDispatcher: its DtoH torch.cuda.Stream
    "megatron.core.transformer.moe.moe_utils",  # track_moe_metrics: torch.zeros(..., device="cuda")
    "megatron.core.transformer.moe.shared_experts",  # SharedExpertMLP's overlap stream
)


@adaptation("pipeline_parallel/schedules.py total_num_tokens, optimizer/{clip_grads,optimizer,"
            "grad_scaler}.py, distributed/param_and_grad_buffer.py, utils.py: "
            "torch.zeros/tensor(..., device='cuda'); distributed_data_parallel.py torch.cuda.Stream")
def patch_cuda_device_literals() -> None:
    for module in _DEVICE_LITERAL_CALLERS:
        view = _torch_of(module)
        _factories_on_cpu(view)
        for name in ("Stream", "Event"):
            _patch(view.cuda, name, _Stream)
        _patch(view.cuda, "current_stream", _Stream)
        _patch(view.cuda, "stream", lambda *a, **k: contextlib.nullcontext())


@adaptation("models/common/embeddings/rope_utils.py get_pos_emb_on_this_cp_rank: "
            "torch.tensor(..., pin_memory=True) (context-parallel RoPE split)")
def patch_pinned_memory() -> None:
    _factories_on_cpu(_torch_of("megatron.core.models.common.embeddings.rope_utils"))


def _split_sizes_on_host(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's `maybe_move_tensor_to_cpu` for CPU tensors: it converts only CUDA tensors to numpy,
    so on the CPU the alltoall dispatcher's split sizes reached `all_to_all_single` as tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.numpy()
    return tensor


@adaptation("transformer/moe/moe_utils.py maybe_move_tensor_to_cpu, called by token_dispatcher.py "
            "MoEAlltoAllTokenDispatcher (EP split sizes): only a CUDA tensor becomes numpy, a CPU one "
            "fails in tensor_parallel/mappings.py all_to_all")
def patch_moe_split_sizes() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for owner in (moe_utils, token_dispatcher):
        _patch(owner, "maybe_move_tensor_to_cpu", _split_sizes_on_host)


def _uneven_gather(original):
    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        most = max(output_split_sizes)
        padded = input_.new_zeros(most, *input_.shape[1:])
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in output_split_sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(parts, output_split_sizes)], dim=0)
    return gather


@adaptation("tensor_parallel/mappings.py _gather_along_first_dim with split sizes (MoE alltoall "
            "dispatcher under expert-TP: each rank's token count differs): a list all_gather of "
            "unequal tensors, which gloo refuses ('invalid tensor size')")
def patch_uneven_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    _patch(mappings, "_gather_along_first_dim", _uneven_gather(mappings._gather_along_first_dim))


@adaptation("models/common/embeddings/yarn_rotary_pos_embedding.py YarnRotaryEmbedding.__init__ "
            "(built by transformer/multi_latent_attention.py MultiLatentAttention without "
            "use_cpu_initialization) and get_emb (moves its inverse frequencies once): "
            "device=torch.cuda.current_device() (YaRN RoPE of multi-latent attention)")
def patch_mla_yarn_device() -> None:
    _patch(_torch_of("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding").cuda,
           "current_device", _cpu_device)


@adaptation("transformer/multi_latent_attention.py MultiLatentAttention.__init__: "
            "`HAVE_TE and isinstance(self.linear_proj, TELinear)` (0.16.1): megatron's TE extension "
            "imports without TE and leaves TELinear a mock, so HAVE_TE is True and isinstance raises")
def patch_mla_te_check() -> None:
    from megatron.core.transformer import multi_latent_attention

    _patch(multi_latent_attention, "HAVE_TE", False)


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

    _patch(p2p_communication, "_batched_p2p_ops", _tagged_batched_p2p_ops)


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

    _patch(clip_grads, "l2_norm_impl", _accurate_l2_norm)


def apply() -> None:
    """Apply every CPU adaptation once; does nothing when CUDA is available."""
    global _applied, _recording
    if _applied or torch.cuda.is_available():
        return
    for a in ADAPTATIONS.values():
        if a.when == CPU:
            _recording = a.patches
            try:
                a.fn()
            finally:
                _recording = None
    _applied = True
