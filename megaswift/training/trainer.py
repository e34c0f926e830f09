"""The training run behind `megatron sft` / `megatron pt` (their commands parse the flags into a `Job`).

Order of work: parse and check every flag, resolve the model and the layout (errors name flags)
-> start the process groups -> tokenise (rank 0 first, the others reuse its cache) -> build the
model chunks and load weights -> DDP, optimizer, schedule -> resume -> train, evaluate, log and
save on their intervals -> final save. SIGTERM (SLURM pre-emption, `kill`, the torchrun launcher
passing either on) and Ctrl-C save and exit cleanly. A run that fails before it has logged or
saved anything removes the run directory it made.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megaswift.args.job import Job
from megaswift.args.parser import explicit
from megaswift.args.train import TrainArgs
from megaswift.checkpointing import ARGS, HF_CONFIG, TRACKER, CheckpointRecord, resolve
from megaswift.converters.hf_io import CheckpointError, HFReader, copy_side_files
from megaswift.logging_utils import log
from megaswift.model.config import check_arch, check_layout, check_sliding_window, transformer_config
from megaswift.model.source import resolve_source
from megaswift.runtime.context import moe_kernels, precision_aware_optimizer
from megaswift.runtime.context import resolve as resolve_runtime
from megaswift.runtime.distributed import barrier, destroy_distributed, init_distributed, is_rank0
from megaswift.runtime.save_dir import check_save
from megaswift.tuners import check_targets


def _save_root(train: TrainArgs) -> Path | None:
    if not train.save:
        return None
    root = Path(train.save).expanduser().resolve()
    if not train.add_version:
        return root
    name = [None]
    if is_rank0():
        n = len([p for p in root.glob("v*-*") if p.is_dir()]) if root.exists() else 0
        name[0] = f"v{n}-{time.strftime('%Y%m%d-%H%M%S')}"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return root / name[0]


def _build_data(job: Job, tokenizer):
    from megaswift.data.cached import load_cached_datasets
    from megaswift.data.pipeline import build_datasets as build_rows
    from megaswift.data.preference import build_preference_datasets

    build_datasets = build_preference_datasets if job.mode == "rlhf" else build_rows  # pairs for DPO

    if job.data.cached_dataset:
        train, val = load_cached_datasets(job.data.cached_dataset)
        return train, val
    result = None
    if is_rank0():  # rank 0 tokenises first; the others then hit the datasets cache
        result = build_datasets(job.data, tokenizer)
    barrier()
    if not is_rank0():
        result = build_datasets(job.data, tokenizer)
    train, val, stats = result
    log(f"data: {json.dumps(stats.as_json())}")
    return train, val


def _check_optimizer(job: Job) -> None:
    """Optimizer choices that megatron-core cannot build, refused before any data is read."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    t = job.train
    if t.optimizer == "sgd" and t.use_distributed_optimizer and dp > 1:
        raise ValueError(f"--optimizer sgd with {dp} data-parallel ranks needs --use_distributed_optimizer "
                         "false: megatron-core's distributed optimizer supports Adam only")


def _check_save(job: Job) -> None:
    """Before any work: `--save` is not the HF model (nor inside it), is a writable directory,
    and a run already in it is continued only by `--load` of that same directory (Megatron-LM's
    resume); anything else would append to its logs and overwrite its checkpoints."""
    t = job.train
    if not t.save:
        return
    root = check_save(t.save, {"--model": job.model.model}, contains=False)
    if t.add_version or not any((root / f).exists() for f in (ARGS, TRACKER, "logging.jsonl")):
        return
    for resumed in (job.model.load, job.tuner.adapter_load):
        if resumed and Path(resumed).expanduser().resolve() == root:
            return
    resume = "--adapter_load" if job.tuner.lora else "--load"
    raise FileExistsError(f"--save {t.save} already holds a run; pass {resume} {t.save} to resume it, "
                          "another --save, or --add_version true for a new vN-<timestamp> run inside it")


def _check_adapters(job: Job, source) -> None:
    """Before any work: --load is a base (not a LoRA run's adapters), and --adapter_load is a LoRA run."""
    if source.is_checkpoint and source.record.flags.get("tuner", {}).get("train_type") == "lora":
        raise CheckpointError(f"--load {job.model.load} holds a LoRA run's adapters only, not a model: pass its "
                              "base as --load/--model and the run as --adapter_load (with --train_type lora)")
    if job.tuner.lora and not job.tuner.target_regex:
        check_targets(job.tuner.target_modules)
    if not job.tuner.adapter_load:
        return
    root = Path(job.tuner.adapter_load).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--adapter_load {job.tuner.adapter_load}: no such directory")
    resolve(root)  # a missing or damaged tracker / iteration is named here
    tuner = CheckpointRecord.read(root).flags.get("tuner") or {}
    if tuner.get("train_type") != "lora":
        raise CheckpointError(f"--adapter_load {job.tuner.adapter_load} is not a LoRA run (its {ARGS} records "
                              f"train_type {tuner.get('train_type', 'full')!r}); pass a full checkpoint as --load")
    # The adapters' shape comes from the run; a flag given here that contradicts it is an error.
    given = explicit(job.tuner)
    differ = {k: (tuner[k], v) for k, v in job.tuner.lora_config().items()
              if k in tuner and k in given and k != "lora_dropout" and tuner[k] != v}
    if differ:
        shown = "; ".join(f"--{k} {a!r} in the run, {b!r} here" for k, (a, b) in differ.items())
        raise ValueError(f"--adapter_load {job.tuner.adapter_load} was trained with other adapters ({shown}): "
                         "drop these flags (the run's are used) or start a new run")
    for k in job.tuner.lora_config():
        if k in tuner and k not in given and k != "lora_dropout":
            setattr(job.tuner, k, tuner[k])


def _made_by_us(save_root: Path) -> Path | None:
    """The topmost directory that creating `save_root` will make (None if it exists)."""
    made = None
    for p in (save_root, *save_root.parents):
        if p.exists():
            return made
        made = p
    return made


def _discard_if_empty(save_root: Path, made: Path | None) -> None:
    """Remove what this run made under `--save` when nothing was logged or saved yet."""
    log_file = save_root / "logging.jsonl"
    if made is None or (save_root / TRACKER).exists() or (log_file.exists() and log_file.stat().st_size):
        return
    shutil.rmtree(made, ignore_errors=True)


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM and SIGINT (Ctrl-C) set `stop`: every rank saves after the current iteration and
    exits 0 (`_agree` in loop.py). A second Ctrl-C aborts at once."""
    stop = {"flag": False, "signal": None}

    def handler(signum, _frame):
        if stop["flag"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.update(flag=True, signal=signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


_SHAPE_MISMATCH = re.compile(r"shape mismatch for loaded \((.+?)\) and expected \((.+?)\) tensor for key (\S+)")


def _foreign_checkpoint(job: Job, error: BaseException, config_dir: Path | None = None) -> CheckpointError | None:
    """megatron-core's shape-mismatch traceback, as one line: the weights under --load are not
    the model the config.json in `config_dir` (--model's, the checkpoint's hf_config/ or the HF
    folder its ms-swift args.json names) describes."""
    m = _SHAPE_MISMATCH.search(str(error))
    if not (m and job.model.load):
        return None
    loaded, expected = (tuple(int(n) for n in re.findall(r"\d+", g)) for g in m.group(1, 2))
    where = f"--model {job.model.model}" if job.model.model else (
        f"{config_dir}/config.json" if config_dir is not None else f"its {ARGS} and {HF_CONFIG}/")
    return CheckpointError(
        f"--load {job.model.load}: {m.group(3)} is {loaded} in the checkpoint but {expected} in the model "
        f"{where} describes: the checkpoint belongs to another model; pass the HF model it was made from as "
        f"--model <hf dir>, or --load a checkpoint of this model")


def _runtime(job: Job):
    """The machine's runtime for the job's flags; a backend the machine cannot serve is replaced
    (nccl needs CUDA tensors, and CUDA tensors are megatron's on GPUs), with one line."""
    runtime = resolve_runtime(job.runtime.transformer_impl, job.runtime.attention_backend)
    asked = job.swift.ddp_backend if "ddp_backend" in explicit(job.swift) else (
        job.megatron.distributed_backend if "distributed_backend" in explicit(job.megatron) else None)
    if asked and asked != runtime.backend:
        log(f"--{'ddp_backend' if job.swift.ddp_backend else 'distributed_backend'} {asked}: "
            f"{'no CUDA here' if not runtime.cuda else 'megatron keeps its tensors on the GPU'}; using {runtime.backend}")
    return runtime


def _timeout_minutes(job: Job) -> int:
    """--distributed_timeout_minutes and ms-swift's --ddp_timeout (seconds): the smaller applies."""
    return max(1, min(job.megatron.distributed_timeout_minutes, -(-job.swift.ddp_timeout // 60)))


def train(job: Job) -> int:
    """Run the training job `megatron pt` / `megatron sft` parsed (module docstring: order of work)."""
    from transformers import AutoTokenizer

    _check_save(job)
    source = resolve_source(job.model.model, job.model.load, job.model.trust_remote_code)
    src, hf_config = source.dir, source.hf_config
    if job.model.load and not job.model.model and src != Path(job.model.load).expanduser() / HF_CONFIG:
        log(f"--load {job.model.load} has no {HF_CONFIG}/ (a Megatron-SWIFT checkpoint): config.json and "
            f"tokenizer from {src}")
    _check_adapters(job, source)
    hf = source.model(job.model.make_vocab_size_divisible_by, job.parallel.tensor_model_parallel_size)
    check_layout(job.parallel, hf_config, hf.family, job.moe, training=True)
    runtime = _runtime(job)
    # the MoE speed options as this machine runs them (megatron-core refuses e.g. permute fusion without TE)
    moe_fields, _ = moe_kernels(job.moe.config_fields(hf.family.config_fields(hf_config)), runtime)
    check_arch(job.arch, transformer_config(hf_config, hf.family, job.parallel.sizes(), torch.float32, **moe_fields),
               hf_config, hf.dims.padded_vocab_size)
    if not source.is_checkpoint:
        HFReader(src).close()  # reads the safetensors headers: a truncated or corrupt file fails here
    dtype = source.dtype(job.model.torch_dtype, bf16=job.model.bf16, fp16=job.model.fp16)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=job.model.trust_remote_code)
    longest = getattr(hf_config, "max_position_embeddings", None)
    default_length = job.data.max_length is None and longest
    if default_length:  # Megatron-SWIFT's default
        job.data.max_length = int(longest)
    budget = job.data.resolved_packing_length if job.data.packing else job.data.max_length
    job.parallel.validate_sequence_budget(budget)
    check_sliding_window(hf_config, budget)
    precision_aware_optimizer(job.megatron, runtime)   # refused before any work where it cannot run
    if default_length:
        log(f"--max_length {longest}: the model's max_position_embeddings (pass --max_length to change it)")
    init_distributed(job.parallel, runtime, timeout_minutes=_timeout_minutes(job))
    try:
        _check_optimizer(job)
        from megaswift.training.loop import train_loop

        train_ds, val_ds = _build_data(job, tokenizer)
        save_root = _save_root(job.train)
        made = _made_by_us(save_root) if save_root is not None and is_rank0() else None
        try:
            if save_root is not None and is_rank0():
                save_root.mkdir(parents=True, exist_ok=True)
                copy_side_files(src, save_root / HF_CONFIG)
                source.checkpoint_record(hf, dtype, job.model.make_vocab_size_divisible_by, job.parallel,
                                         source_model=job.model.model, flags=job.as_record()).write(save_root)
            with _stop_on_signals() as stop:
                train_loop(job, hf, dtype, tokenizer, train_ds, val_ds, save_root, stop)
        except BaseException as e:
            if save_root is not None and is_rank0():
                _discard_if_empty(save_root, made)
            foreign = _foreign_checkpoint(job, e, src)  # torch's CheckpointException is a BaseException
            if foreign is not None:
                raise foreign from None
            raise
    finally:
        destroy_distributed()
    return 0
