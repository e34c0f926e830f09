"""Each CPU adaptation is still needed by the installed megatron-core, and still sufficient."""

from __future__ import annotations

import importlib
import inspect

import torch

from megaswift.runtime import cpu_compat

# adaptation -> (module, function) whose source shows the CUDA assumption it serves, and the text
NEEDED_BY = {
    "patch_rng_tracker": ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "torch.cuda"),
    "patch_cuda_synchronize": ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                               "FileSystemWriterAsync.preload_tensors", "torch.cuda.synchronize"),
    "patch_current_device": ("megatron.core.dist_checkpointing.strategies.state_dict_saver",
                             "save_state_dict_async_finalize", "torch.cuda.current_device()"),
    "patch_cuda_device_literals": ("megatron.core.pipeline_parallel.schedules",
                                   "forward_backward_no_pipelining", 'device="cuda"'),
    "patch_tensor_type": ("megatron.core.optimizer.distrib_optimizer",
                          "DistributedOptimizer._build_model_and_main_param_groups", "'torch.cuda.FloatTensor'"),
    "patch_pinned_memory": ("megatron.core.models.common.embeddings.rope_utils",
                            "get_pos_emb_on_this_cp_rank", "pin_memory=True"),
    "patch_p2p_tags": ("megatron.core.pipeline_parallel.p2p_communication", "_batched_p2p_ops",
                       "torch.distributed.isend, tensor_send_prev, prev_pipeline_rank, group\n"),
    "patch_tensor_cuda": ("megatron.core.models.common.language_module.language_module",
                          "LanguageModule.setup_embeddings_and_output_layer", ".cuda()"),
    "patch_l2_norm": ("megatron.core.utils", "local_multi_tensor_l2_norm", "torch.norm(tensor)"),
}


def _source(module: str, qualname: str) -> str:
    """The function's source as the file has it (the attribute itself may be patched already)."""
    text = inspect.getsource(importlib.import_module(module))
    start = text.index(f"def {qualname.split('.')[-1]}(")
    end = text.find("\ndef ", start + 1)
    return text[start: end if end > 0 else None]


def test_every_adaptation_is_still_needed():
    assert set(NEEDED_BY) == set(cpu_compat.ADAPTATIONS)
    for name, (module, qualname, text) in NEEDED_BY.items():
        assert text in _source(module, qualname), f"{name}: {module}.{qualname} no longer uses {text}"


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


def test_grad_norm_is_accurate_on_large_tensors():
    """megatron's fallback l2 norm (torch.norm in float32) is off by far more than the 1e-5 the
    layout-parity tests allow on a large tensor; the adaptation matches float64."""
    from megatron.core.utils import local_multi_tensor_l2_norm

    cpu_compat.apply()  # megatron's function allocates its result on "cuda"
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4_000_001, generator=g), torch.randn(64, 48, generator=g)]
    exact = sum(t.double().pow(2).sum() for t in grads).sqrt().item()
    stock = local_multi_tensor_l2_norm(0, None, [grads], False)[0].item()
    ours = cpu_compat._accurate_l2_norm(0, None, [grads], False)[0].item()
    assert abs(stock - exact) / exact > 1e-5  # still needed
    assert abs(ours - exact) / exact < 1e-6
    # the norm of one tensor equals the norm of its two TP halves (what made TP runs differ)
    halves = list(grads[0].chunk(2)) + grads[1:]
    assert abs(cpu_compat._accurate_l2_norm(0, None, [halves], False)[0].item() - ours) / ours < 1e-6
