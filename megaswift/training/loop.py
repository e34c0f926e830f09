"""The iteration loop: weights in, steps, evaluation, logs and checkpoints out."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.checkpointing import load_models
from megaswift.converters.convert import load_hf_weights
from megaswift.converters.hf_io import HFReader
from megaswift.context_parallel import padded_length, round_up
from megaswift.data.pipeline import is_stream
from megaswift.logging_utils import log
from megaswift.runtime.context import current as current_runtime
from megaswift.runtime.distributed import device
from megaswift.training.state import has_optimizer_state, load_training_state, save_training_state
from megaswift.training.batches import (EMPTY_SAMPLE, GlobalBatchSampler, IndexedBatches, StreamBatches, eval_batches,
                                     train_iters_for_epochs)
from megaswift.training.logger import TrainLogger
from megaswift.training.moe_metrics import MoEMetrics
from megaswift.training.setup import build_model, wrap_and_optimize
from megaswift.training.method import LanguageModeling, TrainingMethod
from megaswift.tuners import add_lora, count_parameters, set_trainable
from megaswift.training.step import eval_step, train_step


def fixed_shape(job, datasets=()) -> tuple[int, int] | None:
    """(seq_length, micro_batch_size) every micro-batch is padded to, or None for variable shapes.

    Interleaved (virtual) pipeline stages get fixed shapes: megatron-core's per-micro-batch shape
    exchange does not survive the interleaved schedule on gloo (the shape messages are untagged).
    So does MoE's allgather dispatcher, which gathers every rank's tokens as equal-sized pieces.
    With context parallel, packed rows grow by their samples' padding to 2 x CP, so the length
    is the longest such row in ``datasets``.
    """
    allgather = job.moe.moe_token_dispatcher_type == "allgather"
    if not (job.parallel.virtual_pipeline_model_parallel_size or allgather):
        return None
    length = job.data.resolved_packing_length if job.data.packing else job.data.max_length
    if not length:
        why = ("--virtual_pipeline_model_parallel_size" if job.parallel.virtual_pipeline_model_parallel_size
               else "--moe_token_dispatcher_type allgather")
        raise ValueError(f"{why} needs --max_length (micro-batches are padded to a fixed shape)")
    mbs = job.train.micro_batch_size
    if job.mode == "rlhf" and not job.data.packing:
        mbs *= 2  # a preference pair is two sequences (chosen, rejected) of up to --max_length each
    if not job.data.padding_free:
        return (length, mbs)
    cp = job.parallel.context_parallel_size
    if cp > 1:
        if job.data.packing and any(is_stream(ds) for ds in datasets):
            raise ValueError("fixed micro-batch shapes with --context_parallel_size need the "
                             "longest packed row up front: drop --streaming, or pack ahead of time")
        for ds in datasets:
            if ds is not None and "lengths" in (getattr(ds, "column_names", None) or ()):
                longest = max(padded_length(row, cp) for row in ds["lengths"])
                length = max(length, round_up(longest, job.parallel.sequence_multiple))
    return (mbs * length, 1)


def training_method(job, tokenizer, fixed) -> TrainingMethod:
    """The method the command trains with: language modelling (pt/sft) or DPO (rlhf), on this
    run's batch layout."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    multiple = job.parallel.sequence_multiple
    if fixed is not None and fixed[0] % multiple:
        raise ValueError(f"fixed micro-batch length {fixed[0]} must be a multiple of {multiple} "
                         "(TP with sequence parallel / 2 x CP): adjust --max_length")
    layout = dict(pad_id=pad_id, padding_free=job.data.padding_free, multiple=multiple,
                  cp=job.parallel.context_parallel_size, length=fixed[0] if fixed else None)
    if job.mode == "rlhf":
        from megaswift.training.preference import DirectPreference

        return DirectPreference(job.rlhf.loss_config(), **layout)
    return LanguageModeling(**layout)


def _reference_source(job, resume: bool) -> tuple[str | None, str | None]:
    """(MCore checkpoint, HF folder) the reference model is read from: --ref_load, else the
    policy's starting weights (--load's when given, with --model naming only the config). A resumed
    run (--load of a run, with its optimizer) started from whatever that run started from, so its
    args.json is followed back to the first weights."""
    if job.rlhf.ref_load:
        return job.rlhf.ref_load, None
    load, model = job.model.load, job.model.model
    from megaswift.checkpointing import CheckpointRecord

    for _ in range(100):
        if not (load and resume):
            return load, model
        flags = CheckpointRecord.read(Path(load).expanduser()).flags
        if (flags.get("rlhf") or {}).get("ref_load"):
            return flags["rlhf"]["ref_load"], None
        args = flags.get("model_args") or {}
        if not (args.get("model") or args.get("load")):
            return load, None  # an export: it is the starting point
        resume = bool(args.get("load")) and not args.get("finetune")
        load, model = args.get("load"), args.get("model")
    return load, model


def _reference(job, hf, dtype, t, fixed, method, model, chunks, resume: bool) -> None:
    """The DPO reference model: LoRA's base (the policy with its adapters off), or a frozen copy of
    the starting weights (--ref_load, else the policy's --load/--model), with --ref_adapter_load's
    adapters merged in when given."""
    from megaswift.training.preference import reference_runner
    from megaswift.tuners.lora import LoraLinear, adapters_off

    r = job.rlhf
    if job.tuner.lora and not r.ref_adapter_load and not r.ref_load:
        method.reference = reference_runner(method, model, adapters_off)
        log("reference model: the policy with its LoRA adapters off")
        return
    ref_chunks, _ = build_model(hf, job.parallel, dtype, t, fixed, job.moe, job.megatron, job.arch)
    ref_load, ref_model = _reference_source(job, resume)
    if ref_load and not ref_model:
        load_models(ref_chunks, Path(ref_load).expanduser())
    else:
        _load_weights(dataclasses.replace(job, model=dataclasses.replace(job.model, model=ref_model, load=ref_load,
                                                                         finetune=True)), hf, ref_chunks)
    where = ref_model or ref_load
    if r.ref_adapter_load:
        from megaswift.checkpointing import CheckpointRecord

        root = Path(r.ref_adapter_load).expanduser()
        cfg = CheckpointRecord.read(root).flags.get("tuner") or {}
        if cfg.get("train_type") != "lora":
            raise ValueError(f"--ref_adapter_load {r.ref_adapter_load} is not a LoRA run")
        add_lora(ref_chunks, {**job.tuner.lora_config(), **cfg, "lora_dropout": 0.0}, t.seed)
        set_trainable(ref_chunks, dataclasses.replace(job.tuner, train_type="lora",
                                                      modules_to_save=cfg.get("modules_to_save", [])))
        load_models(ref_chunks, root, trainable_only=True)
        for m in (m for c in ref_chunks for m in c.modules() if isinstance(m, LoraLinear)):
            m.merge_()
            m.disabled = True
        where = f"{where} + adapters {r.ref_adapter_load}"
    for c in ref_chunks:
        c.requires_grad_(False)
    method.reference = reference_runner(method, ref_chunks)
    log(f"reference model: a frozen copy of {where}")


def _sample_lengths(ds) -> list[int] | None:
    """Tokens per row of a dataset tokenised ahead; None when unknown until access (lazy)."""
    columns = getattr(ds, "column_names", None)
    if not columns:
        return None
    if "length" in columns:
        return list(ds["length"])
    return [len(x) for x in ds["input_ids"]]


def _train_data(job, train_ds, dp_rank: int, dp_size: int):
    """(steps source, iterations): `StreamBatches` for a stream, else `IndexedBatches`."""
    t = job.train
    if is_stream(train_ds):
        if not t.train_iters:
            raise ValueError("--streaming true: the number of rows is unknown, so --train_iters is required "
                             "(with --max_epochs N training also stops after N passes over the stream)")
        return StreamBatches(train_ds, t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                             max_epochs=t.max_epochs), t.train_iters
    sampler = GlobalBatchSampler(len(train_ds), t.global_batch_size, t.micro_batch_size, dp_rank, dp_size,
                                 seed=job.data.data_seed, shuffle=job.data.train_dataloader_shuffle)
    iters = t.train_iters or train_iters_for_epochs(len(train_ds), t.global_batch_size, t.max_epochs)
    if t.train_iters and t.max_epochs:   # --max_epochs stops training when reached, as Megatron-SWIFT's
        by_epochs = train_iters_for_epochs(len(train_ds), t.global_batch_size, t.max_epochs)
        if by_epochs < iters:
            log(f"--max_epochs {t.max_epochs} is reached after {by_epochs} of --train_iters {t.train_iters} "
                "iterations: training stops there")
            iters = by_epochs
    return IndexedBatches(train_ds, sampler, _sample_lengths(train_ds)), iters


def _real_tokens(step) -> int:
    """Real tokens of the global batch: known on every rank, or (lazy) summed over data-parallel ranks."""
    if step.global_tokens is not None:
        return step.global_tokens
    n = torch.tensor([step.local_tokens], dtype=torch.int64, device=device())
    if parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group())
    return int(n.item())


def _eval_rows(val_ds, t, dp_size: int):
    """A stream's first validation rows, held as a list (the same every evaluation)."""
    if not is_stream(val_ds):
        return val_ds
    from itertools import islice

    return list(islice(iter(val_ds), max(t.eval_iters, 1) * t.micro_batch_size * dp_size))


def _load_weights(job, hf, chunks) -> bool:
    """Base weights before DDP/optimizer exist: --load's checkpoint when given (with --model too:
    that names the config and tokenizer only, as in Megatron-SWIFT), else the HF weights of --model.
    Returns True when a full resume must follow (never for LoRA: its base is frozen, the run's state
    lives under --adapter_load)."""
    if not job.model.load:
        from megaswift.model.hf import resolve_model_dir

        src = resolve_model_dir(job.model.model)
        load_hf_weights(chunks, hf.family, hf.config, HFReader(src), hf.dims)
        log(f"loaded HF weights from {src}")
        return False
    root = Path(job.model.load).expanduser()
    if job.model.finetune or job.tuner.lora or not _resumable(root):
        load_models(chunks, root)
        config = f"; config and tokenizer from --model {job.model.model}" if job.model.model else ""
        log(f"loaded weights from {root} (iteration 0){config}")
        return False
    return True


def _resumable(root: Path) -> bool:
    """`root` holds megaswift's training state (optimizer, schedule, iteration). A run Megatron-LM
    (Megatron-SWIFT) saved holds its own, in its layout: only its weights are read, said once."""
    from megaswift.checkpointing import load_common, resolve

    common = load_common(resolve(root))
    if "has_optimizer" in common:
        return bool(common["has_optimizer"])
    if common.get("opt_param_scheduler") is not None or common.get("optimizer") is not None:
        log(f"--load {root} was saved by Megatron-LM (Megatron-SWIFT) at iteration {common.get('iteration')}: its "
            "optimizer state, schedule and data position are not read; training starts from its weights at "
            "iteration 0 (as with --finetune true)")
    return False


def _tune(job, chunks, seed: int) -> str | None:
    """Graft LoRA (--train_type lora) and set what trains. Returns "resume" when the LoRA run under
    --adapter_load continues with its optimizer, "weights" when only its adapters were loaded."""
    from megatron.core import parallel_state as ps

    tuner = job.tuner
    if tuner.lora:
        n = add_lora(chunks, tuner.lora_config(), seed)
        log(f"LoRA r={tuner.lora_rank} alpha={tuner.lora_alpha} on {n} linears of this rank"
            + (f"; modules_to_save {' '.join(tuner.modules_to_save)}" if tuner.modules_to_save else ""))
    set_trainable(chunks, tuner, ps.get_pipeline_model_parallel_world_size())
    if not tuner.adapter_load:
        return None
    root = Path(tuner.adapter_load).expanduser()
    if job.model.finetune or not has_optimizer_state(root):
        load_models(chunks, root, trainable_only=True)
        log(f"loaded adapters from {root} (iteration 0)")
        return "weights"
    return "resume"


def train_loop(job, hf, dtype, tokenizer, train_ds, val_ds, save_root: Path | None, stop: dict) -> None:
    t = job.train
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    sampler, iters = _train_data(job, train_ds, dp_rank, dp_size)
    if t.optimizer_cpu_offload and not current_runtime().cuda:
        # the optimizer state already lives in host memory; megatron's hybrid optimizer assumes CUDA
        t = dataclasses.replace(t, optimizer_cpu_offload=False)
        log("--optimizer_cpu_offload: no GPU, the optimizer already runs on the CPU (nothing to offload)")
    if dp_size == 1 and t.use_distributed_optimizer and not t.optimizer_cpu_offload:
        # Nothing to shard over one data-parallel rank; its reduce-scatter/all-gather round trip
        # cost ~1.5 s of a 6.5 s SmolLM2 step on CPU.
        t = dataclasses.replace(t, use_distributed_optimizer=False)
        log("one data-parallel rank: using the plain (non-distributed) optimizer")
    fixed = fixed_shape(job, (train_ds, val_ds))
    chunks, config = build_model(hf, job.parallel, dtype, t, fixed, job.moe, job.megatron, job.arch)
    resume = _load_weights(job, hf, chunks)
    adapters = _tune(job, chunks, t.seed)
    counts = count_parameters(chunks)
    log(counts.line())
    model, optimizer, scheduler = wrap_and_optimize(chunks, config, t, iters, job.megatron)
    method = training_method(job, tokenizer, fixed)
    if job.mode == "rlhf":
        _reference(job, hf, dtype, t, fixed, method, model, chunks, resume)
    start = 0
    if resume or adapters == "resume":
        root = Path(job.tuner.adapter_load if adapters else job.model.load).expanduser()
        start = load_training_state(root, chunks, optimizer, scheduler, trainable_only=job.tuner.lora,
                                    method=method, load_optim=not job.model.no_load_optim,
                                    load_rng=not job.model.no_load_rng)
        fresh = [what for what, skip in (("optimizer state (--no_load_optim)", job.model.no_load_optim),
                                         ("RNG state (--no_load_rng)", job.model.no_load_rng)) if skip]
        log(f"resumed from {root} at iteration {start}" + (f"; fresh {' and '.join(fresh)}" if fresh else ""))
    if val_ds is not None and t.eval_interval:
        val_ds = _eval_rows(val_ds, t, dp_size)
    writer = dist.get_rank() == dist.get_world_size() - 1   # on the last stage, holds the loss
    logger = TrainLogger(save_root, t.tensorboard_dir, writer, iters, job.megatron)
    logger.log_start(start, {"trainable_params": counts.trainable, "total_params": counts.total})
    n_params = _count_params(chunks)
    moe_metrics = MoEMetrics(chunks, config) if config.num_moe_experts else None
    log(f"training {iters} iterations from {start}: {sampler.num_microbatches} micro-batches of "
        f"{t.micro_batch_size} per step on each of {dp_size} data-parallel ranks; {n_params / 1e6:.1f}M parameters")
    it = logged_at = start
    gc_every = _manual_gc(job.megatron)
    try:
        while it < iters:
            step = sampler.step(it)
            if step is None:  # a stream read --max_epochs times: stop, with a checkpoint
                log(f"--max_epochs {t.max_epochs}: the training stream is exhausted; stopped after iteration {it}")
                if save_root is not None and it > start and not (t.save_interval and it % t.save_interval == 0):
                    save_training_state(save_root, it, chunks, optimizer, scheduler, save_optim=not t.no_save_optim,
                                        save_rng=not t.no_save_rng, trainable_only=job.tuner.lora, method=method)
                    log(f"saved iteration {it} to {save_root}")
                break
            if gc_every and it % gc_every == 0 and it > start:
                gc.collect()
            batches = _prepared([step.collated(method.collate) for _ in model], method, sampler.num_microbatches,
                                config, fixed)
            metrics = train_step(model, optimizer, scheduler, batches, sampler.num_microbatches, config,
                                 method, fixed)
            it += 1
            real = _real_tokens(step)
            logger.step(real)
            console = it % t.log_interval == 0 or it == iters
            write = it % job.megatron.tensorboard_log_interval == 0 or it == iters
            if console or write:
                if moe_metrics is not None:  # collective
                    metrics.update(moe_metrics.collect(sampler.num_microbatches * (it - logged_at)))
                logged_at = it
                if t.log_throughput:
                    metrics["tflops_per_device"] = 6 * n_params * real / 1e12 / dist.get_world_size()
                logger.log(it, {**metrics, "consumed_samples": it * t.global_batch_size}, start, console, write)
            if val_ds is not None and t.eval_interval and (it % t.eval_interval == 0 or it == iters):
                logger.log_eval(it, _evaluate(model, val_ds, method, fixed, t, config, dp_rank, dp_size))
            should_stop = _agree(stop["flag"])
            if save_root is not None and (should_stop or it == iters or (t.save_interval and it % t.save_interval == 0)):
                save_training_state(save_root, it, chunks, optimizer, scheduler, save_optim=not t.no_save_optim,
                                    save_rng=not t.no_save_rng, trainable_only=job.tuner.lora, method=method)
                log(f"saved iteration {it} to {save_root}")
            if should_stop:
                log(f"{stop.get('signal') or 'SIGTERM'}: stopped after iteration {it}"
                    + (" with a checkpoint" if save_root is not None else "; no --save, nothing saved"))
                break
    finally:
        logger.close()
        if gc_every is not None:
            gc.enable()


def _manual_gc(megatron) -> int | None:
    """--manual_gc: Python's collector off while training (its pauses differ per rank and stall
    collectives), run every --manual_gc_interval steps instead. Returns the interval (0: never)."""
    if not megatron.manual_gc:
        return None
    gc.disable()
    gc.collect()
    return megatron.manual_gc_interval


def _prepared(batches: list, method, num_microbatches: int, config, fixed) -> list:
    """The micro-batch iterators of one step; a method with a `prepare` pass (DPO's reference
    model) sees them first, so they are materialised."""
    if not hasattr(method, "prepare"):
        return batches
    lists = [list(b) for b in batches]
    method.prepare(lists, num_microbatches, config, fixed)
    return [iter(b) for b in lists]


def _agree(flag: bool) -> bool:
    """Every rank stops at the same iteration if any rank got SIGTERM."""
    t = torch.tensor([1 if flag else 0], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _evaluate(model, val_ds, method, fixed, t, config, dp_rank, dp_size) -> dict:
    groups = eval_batches(val_ds, t.micro_batch_size, dp_rank, dp_size, t.eval_iters)
    if not groups:
        return {"loss": float("nan")}
    if len(model) > 1:  # megatron's interleaved schedule runs a multiple of PP micro-batches:
        pp = parallel_state.get_pipeline_model_parallel_world_size()  # pad with untrained ones
        groups = groups + [[]] * (-len(groups) % pp)

    def batches():
        for g in groups:
            yield method.collate([s for s in (val_ds[i] for i in g) if s is not None] or [EMPTY_SAMPLE])

    return eval_step(model, _prepared([batches() for _ in model], method, len(groups), config, fixed), len(groups),
                     config, method, fixed)


def _count_params(chunks) -> int:
    """Parameters of the whole model (summed over TP and PP ranks of this data-parallel replica)."""
    local = torch.tensor([sum(p.numel() for c in chunks for p in c.parameters())], dtype=torch.float64,
                         device=device())
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        # replicated (norm) params are counted TP times; close enough for a throughput figure
        dist.all_reduce(local, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(local, group=parallel_state.get_pipeline_model_parallel_group())
    return int(local.item())
