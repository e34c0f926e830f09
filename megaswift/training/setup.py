"""Model chunks wrapped in megatron-core DDP, the optimizer and the LR schedule, built once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megaswift.args.megatron import ArchArgs, MegatronArgs
from megaswift.args.moe import MoEArgs
from megaswift.args.parallel import ParallelArgs
from megaswift.args.train import TrainArgs
from megaswift.model.builder import build_gpt_model
from megaswift.model.config import transformer_config
from megaswift.model.hf import HFModel
from megaswift.logging_utils import log
from megaswift.runtime.context import current as current_runtime
from megaswift.runtime.context import kernel_fusions, moe_kernels, precision_aware_optimizer
from megaswift.runtime.distributed import is_rank0


@dataclass
class TrainState:
    """Everything the loop needs; `model` holds the DDP-wrapped chunks (one per virtual stage)."""
    model: list
    config: object
    optimizer: object
    scheduler: OptimizerParamScheduler
    hf: HFModel


def unwrap(chunks: list) -> list:
    return [c.module if isinstance(c, DistributedDataParallel) else c for c in chunks]


def recompute_overrides(train: TrainArgs) -> dict:
    if train.recompute_granularity is None:
        return {}
    out = {"recompute_granularity": train.recompute_granularity}
    if train.recompute_granularity == "full":
        out.update(recompute_method=train.recompute_method, recompute_num_layers=train.recompute_num_layers)
    else:
        out["recompute_modules"] = list(train.recompute_modules)
    return out


_noted: set[str] = set()


def build_model(hf: HFModel, parallel: ParallelArgs, dtype: torch.dtype, train: TrainArgs,
                fixed_shape: tuple[int, int] | None = None, moe: MoEArgs | None = None,
                megatron: MegatronArgs | None = None, arch: ArchArgs | None = None) -> tuple[list, object]:
    """This rank's (unwrapped) model chunks and their TransformerConfig.

    `fixed_shape` (seq_length, micro_batch_size) when every micro-batch has one shape; otherwise
    shapes are exchanged between pipeline stages per micro-batch. `moe`: the MoE flags over the
    model's config.json, speed-only options turned portable where the machine lacks them.
    """
    moe_fields, notes = moe_kernels((moe or MoEArgs()).config_fields(hf.family.config_fields(hf.config)),
                                    current_runtime())
    recompute = recompute_overrides(train)
    if "moe_act" in recompute.get("recompute_modules", ()) and not moe_fields.get("moe_grouped_gemm"):
        # memory only: megatron-core recomputes the expert activation in grouped-GEMM experts alone
        recompute["recompute_modules"] = [m for m in recompute["recompute_modules"] if m != "moe_act"]
        notes.append("--recompute_modules moe_act: megatron-core recomputes it only in grouped-GEMM experts "
                     "(--moe_grouped_gemm true with TransformerEngine); the expert activations are kept here")
    # megatron-core 0.16 checks its dispatcher against variable sequence lengths on dense models
    # too, and its default (allgather) is refused there
    moe_fields.setdefault("moe_token_dispatcher_type", "alltoall")
    megatron, arch = megatron or MegatronArgs(), arch or ArchArgs()
    fusions, fusion_notes = kernel_fusions(megatron, current_runtime())
    notes += fusion_notes
    overrides = {
        "perform_initialization": False,   # weights always come from an HF or MCore checkpoint
        "calculate_per_token_loss": train.calculate_per_token_loss,
        "variable_seq_lengths": fixed_shape is None,  # padding-free batches differ in length
        **moe_fields,
        "attention_dropout": arch.attention_dropout, "hidden_dropout": arch.hidden_dropout,
        "deterministic_mode": megatron.deterministic_mode,
        "attention_softmax_in_fp32": megatron.attention_softmax_in_fp32,
        **fusions, **recompute, **megatron.extra_config(),
    }
    for note in notes:
        if note not in _noted and is_rank0():
            log(note)
        _noted.add(note)
    config = transformer_config(hf.config, hf.family, parallel.sizes(), dtype, **overrides)
    if megatron.deterministic_mode:
        torch.use_deterministic_algorithms(True, warn_only=True)
    tensor_parallel.model_parallel_cuda_manual_seed(train.seed)
    vpp = parallel.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = [build_gpt_model(hf.config, config, padded_vocab=hf.dims.padded_vocab_size, vp_stage=v)
              for v in stages]
    return chunks, config


def wrap_and_optimize(chunks: list, config, train: TrainArgs, train_iters: int,
                      megatron: MegatronArgs | None = None) -> tuple[list, object, OptimizerParamScheduler]:
    """DDP-wrap the chunks, build megatron's optimizer and LR schedule, wire the grad hooks."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=train.overlap_grad_reduce,
        overlap_param_gather=train.overlap_param_gather,
        use_distributed_optimizer=train.use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    model = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]
    opt_config = OptimizerConfig(
        optimizer=train.optimizer, lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        sgd_momentum=train.sgd_momentum,
        clip_grad=train.clip_grad, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=train.use_distributed_optimizer,
        optimizer_cpu_offload=train.optimizer_cpu_offload,
        optimizer_offload_fraction=train.optimizer_offload_fraction if train.optimizer_cpu_offload else 0.0,
        # megatron's hybrid CPU/GPU optimizer keeps fp32 master copies itself
        overlap_param_gather_with_optimizer_step=False,
        **{"use_precision_aware_optimizer": train.optimizer_cpu_offload,
           **precision_aware_optimizer(megatron or MegatronArgs(), current_runtime())},
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    decay_iters = train.lr_decay_iters or train_iters
    warmup = train.lr_warmup_iters
    if train.lr_warmup_fraction is not None:
        warmup = int(train.lr_warmup_fraction * decay_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay_iters, lr_decay_style=train.lr_decay_style,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=decay_iters,
        wd_incr_style="constant", wsd_decay_steps=train.lr_wsd_decay_iters, lr_wsd_decay_style=train.lr_wsd_decay_style)
    # Without these hooks gradients are never reduced across data-parallel ranks.
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [m.no_sync for m in model]
    config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
    if train.overlap_grad_reduce:
        sync = [m.start_grad_sync for m in model]
        config.grad_sync_func = sync[0] if len(model) == 1 else sync
    if train.overlap_param_gather:
        gather = [m.start_param_sync for m in model]
        config.param_sync_func = gather[0] if len(model) == 1 else gather
    return model, optimizer, scheduler


def data_parallel_info() -> tuple[int, int]:
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
