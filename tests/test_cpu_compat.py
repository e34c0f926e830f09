"""Each megatron-core adaptation is still needed and still sufficient, shown by behaviour: the
megatron call it serves fails or is wrong on CPU without it (`cpu_compat.suspended`, or for the
version fixes, not calling them) and works with it, against the installed megatron-core. Torch
itself stays plain: the CPU adaptations change names inside megatron-core only.
"""

from __future__ import annotations

import socket

import pytest
import torch

from megaswift.runtime import cpu_compat, megatron_fixes

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU adaptations are inert with CUDA")


def exercises(*names: str):
    """Mark a test as the behaviour test of these adaptations."""
    def deco(fn):
        fn.exercises = names
        return fn
    return deco


@pytest.fixture(scope="module")
def world():
    """A one-process gloo world with megatron's parallel groups; the adaptations applied."""
    from megaswift.args.parallel import ParallelArgs
    from megaswift.runtime.distributed import destroy_distributed, init_distributed

    init_distributed(ParallelArgs())
    try:
        yield torch.distributed.group.WORLD
    finally:
        destroy_distributed()


def test_torch_stays_plain_after_apply(world):
    """transformers and user code see torch as installed (none of it is patched)."""
    from megatron.core.optimizer import clip_grads

    assert torch.Tensor.type is torch._C.TensorBase.type and torch.Tensor.cuda is torch._C.TensorBase.cuda
    assert torch.cuda.current_device.__module__ == torch.cuda.synchronize.__module__ == "torch.cuda"
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    clip_grads.clip_grad_by_total_norm_fp32([p], 1.0, 10.0)  # patched megatron code ran: still plain after it
    assert "type" not in vars(torch.Tensor) and "cuda" not in vars(torch.Tensor)
    t = torch.zeros(2)
    assert t.type() == "torch.FloatTensor"
    for cuda_only in (t.cuda, torch.cuda.current_device, torch.cuda.synchronize,
                      lambda: torch.zeros(1, device="cuda")):
        with pytest.raises((AssertionError, RuntimeError)):  # "Torch not compiled with CUDA enabled"
            cuda_only()


@exercises("patch_rng_tracker")
def test_rng_tracker(world):
    from megatron.core import tensor_parallel

    with cpu_compat.suspended("patch_rng_tracker"), pytest.raises(AssertionError, match="CUDA"):
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    draws = []
    for _ in range(2):
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            draws.append(torch.rand(3))
    assert torch.equal(*draws)


def test_rng_tracker_forks_reproducibly():
    tracker = cpu_compat.CPURNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the default stream is untouched by the fork
    tracker2 = cpu_compat.CPURNGStatesTracker()
    tracker2.add("model-parallel-rng", 1234)
    with tracker2.fork():
        assert torch.equal(torch.rand(3), a)
    with tracker.fork():
        assert not torch.equal(torch.rand(3), a)  # the forked stream advanced


@exercises("patch_cuda_synchronize")
def test_checkpoint_preload_synchronizes(world):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    t = torch.arange(4.0)
    buckets = [("f", "k", ([], [("item", t)]))]
    with cpu_compat.suspended("patch_cuda_synchronize"), pytest.raises(AssertionError, match="CUDA"):
        FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    (_, _, (_, [(_, got)])), = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    assert torch.equal(got, t)


@exercises("patch_current_device")
def test_current_device_in_rope_and_ddp_buffers(world):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    with cpu_compat.suspended("patch_current_device"):
        with pytest.raises(AssertionError, match="CUDA"):
            rope.get_emb(4)
        with pytest.raises(AssertionError, match="CUDA"):
            _tiny_ddp(distributed=False)  # _ParamAndGradBuffer allocates on torch.cuda.current_device()
    freqs = torch.outer(torch.arange(4.0), rope.inv_freq)
    assert torch.allclose(rope.get_emb(4).flatten(1), torch.cat([freqs, freqs], -1))
    ddp = _tiny_ddp(distributed=False)
    assert all(b.grad_data.device.type == "cpu" for b in ddp.buffers)


@exercises("patch_tensor_cuda", "patch_pinned_memory")
def test_cp_rope_split_moves_index_to_cuda(world):
    """get_pos_emb_on_this_cp_rank builds its index in pinned memory and calls .cuda() on it."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    emb = torch.randn(8, 1, 1, 4)
    for name, error in (("patch_tensor_cuda", AssertionError), ("patch_pinned_memory", RuntimeError)):
        with cpu_compat.suspended(name), pytest.raises(error):
            rotary_pos_embedding.get_pos_emb_on_this_cp_rank(emb, 0, world)
    assert torch.equal(rotary_pos_embedding.get_pos_emb_on_this_cp_rank(emb, 0, world), emb)  # CP = 1


@exercises("patch_tensor_type")
def test_cuda_type_checks_in_the_optimizer(world):
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    with cpu_compat.suspended("patch_tensor_type"):
        with pytest.raises(AssertionError):  # param.grad.type() == 'torch.cuda.FloatTensor'
            clip_grads.clip_grad_by_total_norm_fp32([p], 1.0, 10.0)
        with pytest.raises(TypeError, match="torch.cuda.FloatTensor"):
            _optimizer(_tiny_ddp(distributed=True), "adam", distributed=True)
    clip_grads.clip_grad_by_total_norm_fp32([p], 1.0, 10.0)
    assert torch.allclose(p.grad, torch.full((3,), 2.0 / (10.0 + 1e-6)))
    _optimizer(_tiny_ddp(distributed=True), "adam", distributed=True)


@exercises("patch_cuda_device_literals", "patch_l2_norm")
def test_grad_norm(world):
    """get_grad_norm_fp32 allocates on device='cuda'; megatron's fallback l2 norm (torch.norm in
    float32) is off by far more than the 1e-5 the layout-parity tests allow on a large tensor."""
    from megatron.core.optimizer import clip_grads

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4_000_001, generator=g), torch.randn(64, 48, generator=g)]
    exact = sum(t.double().pow(2).sum() for t in grads).sqrt().item()
    with cpu_compat.suspended("patch_cuda_device_literals"), pytest.raises((AssertionError, RuntimeError)):
        clip_grads.get_grad_norm_fp32(grads)
    with cpu_compat.suspended("patch_l2_norm"):
        stock = clip_grads.get_grad_norm_fp32(grads)
    ours = clip_grads.get_grad_norm_fp32(grads)
    assert abs(stock - exact) / exact > 1e-5
    assert abs(ours - exact) / exact < 1e-6
    # the norm of one tensor equals the norm of its two TP halves (what made TP runs differ)
    halves = list(grads[0].chunk(2)) + grads[1:]
    assert abs(clip_grads.get_grad_norm_fp32(halves) - ours) / ours < 1e-6


def _p2p_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cpu_compat.apply()
        from megatron.core.pipeline_parallel import p2p_communication

        other, got = 1 - rank, {}
        for label, ctx in (("stock", cpu_compat.suspended("patch_p2p_tags")), ("patched", cpu_compat.suspended())):
            with ctx:
                grad, act, recv_prev, recv_next = (torch.full((3,), 10.0 + rank), torch.full((3,), 20.0 + rank),
                                                   torch.zeros(3), torch.zeros(3))
                for req in p2p_communication._batched_p2p_ops(
                        tensor_send_prev=grad, tensor_recv_prev=recv_prev, tensor_send_next=act,
                        tensor_recv_next=recv_next, group=dist.group.WORLD,
                        prev_pipeline_rank=other, next_pipeline_rank=other):
                    req.wait()
            got[label] = (recv_prev[0].item(), recv_next[0].item())
            dist.barrier()   # the refused gather errors locally: keep the ranks in step before the next
        torch.save(got, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@exercises("patch_p2p_tags")
def test_p2p_with_one_peer_both_ways(tmp_path):
    """Two pipeline ranks are each other's previous and next stage: an activation travels to the
    next stage and a gradient to the previous one, both to the same peer in one batch."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_p2p_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        other = 1 - rank
        assert got["stock"] == (10.0 + other, 20.0 + other)  # untagged: the activation slot got the gradient
        assert got["patched"] == (20.0 + other, 10.0 + other)  # (activation from prev, gradient from next)


def _moe_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cpu_compat.apply()
        from megatron.core.tensor_parallel import mappings
        from megatron.core.transformer.moe import moe_utils

        group, got = dist.group.WORLD, {}
        mine = torch.full((2 + rank, 3), float(rank + 1))  # rank 0 holds 2 tokens, rank 1 holds 3
        sizes = [2, 3]
        for label, ctx in (("stock", cpu_compat.suspended("patch_uneven_gather", "patch_moe_split_sizes")),
                           ("patched", cpu_compat.suspended())):
            with ctx:
                try:
                    got[label, "gather"] = mappings._gather_along_first_dim(mine, group, output_split_sizes=sizes)
                except RuntimeError as e:
                    got[label, "gather"] = str(e)
                got[label, "reduce_scatter"] = mappings._reduce_scatter_along_first_dim(
                    torch.arange(15.0).view(5, 3), group, input_split_sizes=sizes)
                got[label, "split_sizes"] = type(moe_utils.maybe_move_tensor_to_cpu(
                    torch.tensor(sizes), as_numpy=True)).__name__
            dist.barrier()   # the refused gather errors locally: keep the ranks in step before the next
        torch.save(got, f"{out}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@exercises("patch_uneven_gather", "patch_moe_split_sizes")
def test_moe_dispatch_collectives_with_uneven_token_counts(tmp_path):
    """The alltoall dispatcher under expert-TP gathers and reduce-scatters a different number of
    tokens per rank, and hands `all_to_all` its split sizes as numpy (what it does for CUDA tensors).
    gloo gathers only equal pieces; its reduce-scatter takes unequal ones (no adaptation)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_moe_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    both = torch.arange(15.0).view(5, 3) * 2
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert isinstance(got["stock", "gather"], str) and "size" in got["stock", "gather"]  # gloo refuses
        assert torch.equal(got["patched", "gather"], torch.cat([torch.full((2, 3), 1.0), torch.full((3, 3), 2.0)]))
        # gloo's list reduce_scatter takes unequal pieces: megatron's own path serves there
        assert torch.equal(got["stock", "reduce_scatter"], both[:2] if rank == 0 else both[2:])
        assert got["stock", "split_sizes"] == "Tensor" and got["patched", "split_sizes"] == "ndarray"


@exercises("router_gemm_without_te")
def test_router_gating_without_transformer_engine(world):
    from megatron.core.transformer.moe import moe_utils

    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    saved = moe_utils.te_general_gemm
    del moe_utils.te_general_gemm   # as megatron-core 0.16.1 leaves it without TE
    try:
        with pytest.raises(NameError, match="te_general_gemm"):
            moe_utils.RouterGatingLinearFunction.apply(x, w, None, torch.float32)
        megatron_fixes.router_gemm_without_te()
        out = moe_utils.RouterGatingLinearFunction.apply(x, w, None, torch.float32)
        assert torch.allclose(out, x @ w.T)
    finally:
        moe_utils.te_general_gemm = saved


@exercises("z_loss_per_token_scale")
def test_z_loss_gradient_does_not_shrink_with_sequence_parallel(world):
    """One of two sequence-parallel ranks: with per-token loss its z-loss gradient must be the
    coefficient times d(sum of z over its tokens), as on a single rank (the TP ranks' router
    gradients are summed); megatron-core's is half of it."""
    from types import SimpleNamespace

    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.moe.router import TopKRouter

    router = TopKRouter.__new__(TopKRouter)
    torch.nn.Module.__init__(router)
    router.config = SimpleNamespace(moe_z_loss_coeff=1e-2, num_layers=1, mtp_num_layers=None)
    router.tp_cp_group = SimpleNamespace(size=lambda: 2)
    router.calculate_per_token_loss, router.layer_number = True, 1
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    logits = torch.randn(6, 4)

    def z_grad(apply):
        x = logits.clone().requires_grad_()
        apply(router, x).sum().backward()
        return x.grad - 1.0   # minus the gradient of .sum() itself

    x = logits.clone().requires_grad_()
    (1e-2 * torch.logsumexp(x, dim=-1).square().sum()).backward()
    fixed = z_grad(TopKRouter.apply_z_loss)
    stock = z_grad(TopKRouter.apply_z_loss.__wrapped__)
    assert torch.allclose(fixed, x.grad, atol=1e-7) and torch.allclose(stock, x.grad / 2, atol=1e-7)


@exercises("expert_bias_padding_mask")
def test_expert_bias_counts_only_real_tokens(world):
    """Expert-bias routing counts each expert's tokens; with a padding mask megatron-core's count
    fails to broadcast, fixed it counts the real tokens only."""
    from megatron.core.transformer.moe.router import TopKRouter

    router = TopKRouter.__new__(TopKRouter)
    torch.nn.Module.__init__(router)
    router.enable_expert_bias = True
    router.register_buffer("local_tokens_per_expert", torch.zeros(4))
    routing_map = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    padding = torch.tensor([False, False, True])   # the third token is padding
    with pytest.raises(RuntimeError):
        TopKRouter._apply_expert_bias.__wrapped__(router, routing_map, padding)
    TopKRouter._apply_expert_bias(router, routing_map, padding)
    assert router.local_tokens_per_expert.tolist() == [1.0, 2.0, 1.0, 0.0]


@exercises("recompute_without_fp8")
def test_output_discarding_recompute_without_transformer_engine(world):
    """--recompute_modules layernorm / moe_act / mla_up_proj checkpoint without keeping the output;
    without TE, megatron-core's took the FP8 path for fp8=False and failed."""
    from megatron.core.tensor_parallel import random as tp_random

    x = torch.randn(5, requires_grad=True)
    stock = tp_random.CheckpointWithoutOutput.__new__(tp_random.CheckpointWithoutOutput)
    tp_random.CheckpointWithoutOutput.__init__.__wrapped__(stock)
    with pytest.raises(NameError, match="FP8GlobalStateManager"):
        stock.checkpoint(torch.sin, x)
    fixed = tp_random.CheckpointWithoutOutput()
    y = fixed.checkpoint(torch.sin, x)
    z = y * 2
    fixed.discard_output_and_register_recompute(z)
    z.sum().backward()
    assert torch.allclose(x.grad, 2 * torch.cos(x))


# -- megatron-core version fixes: a real save and load through megatron's optimizer state dict ---

def _tiny_ddp(distributed: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed, grad_reduce_in_fp32=True)
    return DistributedDataParallel(config, ddp_config, model)


def _optimizer(ddp, kind: str, distributed: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(OptimizerConfig(optimizer=kind, lr=1e-2, sgd_momentum=0.9,
                                                  use_distributed_optimizer=distributed), [ddp])


def _step(ddp, optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    for p in ddp.module.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=g))
    optimizer.step()


def _sharded(ddp, optimizer, loading: bool) -> dict:
    state = {"model": ddp.module.sharded_state_dict()}
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    return state


def _saved_after_3_steps(kind: str, distributed: bool, ckpt):
    """The uninterrupted run (model, optimizer) after 3 steps, saved into `ckpt`."""
    from megatron.core import dist_checkpointing

    ddp = _tiny_ddp(distributed)
    optimizer = _optimizer(ddp, kind, distributed)
    ckpt.mkdir(exist_ok=True)
    for i in range(3):
        _step(ddp, optimizer, i)
    dist_checkpointing.save(_sharded(ddp, optimizer, loading=False), str(ckpt))
    return ddp, optimizer


def _resumed(kind: str, distributed: bool, ckpt, before=None, after=None):
    """A fresh model and optimizer loaded from `ckpt` as training/state.py does, with the given
    fix hooks (None: megatron-core alone)."""
    from megatron.core import dist_checkpointing

    ddp = _tiny_ddp(distributed)
    optimizer = _optimizer(ddp, kind, distributed)
    with torch.no_grad():
        if before:
            before(optimizer)
        loaded = dist_checkpointing.load(_sharded(ddp, optimizer, loading=True), str(ckpt))
        ddp.module.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
        if after:
            after(optimizer, loaded["optimizer"])
    return ddp, optimizer


def _same_next_step(a, b) -> bool:
    """One more step of both runs leaves identical weights."""
    _step(*a, 3)
    _step(*b, 3)
    return all(torch.equal(x, y) for x, y in zip(a[0].module.parameters(), b[0].module.parameters()))


def _states(optimizer, key: str) -> list[torch.Tensor]:
    """`key` of every parameter's state in the torch optimizer(s) inside `optimizer`."""
    return [s[key] for opt in getattr(optimizer, "chained_optimizers", [optimizer])
            for s in opt.optimizer.state.values()]


@exercises("adam_state_placeholders", "restore_adam_steps")
def test_distributed_adam_resume(world, tmp_path):
    ref = _saved_after_3_steps("adam", True, tmp_path)
    with pytest.raises(AssertionError):  # DistributedOptimizer.state_dict: no 'step' before the first step
        _resumed("adam", True, tmp_path)
    # placeholders alone: the load succeeds but every parameter shares one step tensor holding 0
    half = _resumed("adam", True, tmp_path, before=megatron_fixes.adam_state_placeholders)
    steps = _states(half[1], "step")
    assert {float(s) for s in steps} == {0.0} and len({id(s) for s in steps}) == 1
    assert not _same_next_step(_saved_after_3_steps("adam", True, tmp_path / "again"), half)
    fixed = _resumed("adam", True, tmp_path, megatron_fixes.before_optimizer_load,
                     megatron_fixes.after_optimizer_load)
    steps = _states(fixed[1], "step")
    assert {float(s) for s in steps} == {3.0} and len({id(s) for s in steps}) == len(steps)
    assert _same_next_step(ref, fixed)


@exercises("sgd_state_placeholders")
def test_sgd_resume(world, tmp_path):
    ref = _saved_after_3_steps("sgd", False, tmp_path)
    with pytest.raises(TypeError, match="NoneType"):  # FP32Optimizer.sharded_state_dict calls init_state_fn=None
        _resumed("sgd", False, tmp_path)
    fixed = _resumed("sgd", False, tmp_path, megatron_fixes.before_optimizer_load,
                     megatron_fixes.after_optimizer_load)
    momentum, saved = _states(fixed[1], "momentum_buffer"), _states(ref[1], "momentum_buffer")
    assert len(momentum) == len(saved) > 0 and all(torch.equal(a, b) for a, b in zip(momentum, saved))
    assert _same_next_step(ref, fixed)


def test_every_adaptation_has_a_behaviour_test():
    import test_deepseek  # multi-latent attention's adaptations are tested beside its conversion

    tests = list(globals().values()) + list(vars(test_deepseek).values())
    tested = {name for fn in tests for name in getattr(fn, "exercises", ())}
    assert tested == set(cpu_compat.ADAPTATIONS)
