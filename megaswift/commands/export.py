"""`megatron export`: HF -> MCore (`--to_mcore`), MCore -> HF (`--to_hf`) at any TP/PP layout,
and `--to_cached_dataset` (tokenise once for later runs).

LoRA: `--adapter_load <run> --to_hf true` writes a LoRA run as a PEFT adapter folder, or with
`--merge_lora true` as an HF model with the adapter folded in; `--adapters <peft_dir> --to_mcore
true` imports a PEFT LoRA folder as a megaswift LoRA checkpoint (adapter only, for --adapter_load).

Output is staged in a hidden sibling directory and renamed into place only when complete
(`runtime/save_dir.staged`), so a failed conversion leaves no partial `--save`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megaswift.args.data import DataArgs
from megaswift.args.export import ExportArgs
from megaswift.args.parallel import LayoutError, ParallelArgs
from megaswift.args.parser import parse
from megaswift.args.runtime import RuntimeArgs
from megaswift.args.tuner import TunerArgs
from megaswift.checkpointing import ARGS, HF_CONFIG, CheckpointRecord, load_models, resolve, save_models
from megaswift.converters.convert import load_hf_weights
from megaswift.converters.hf_io import CheckpointError, HFReader, copy_side_files
from megaswift.logging_utils import log
from megaswift.model.hf import HFModel, resolve_model_dir
from megaswift.model.source import Source, resolve_source
from megaswift.runtime.context import resolve as resolve_runtime
from megaswift.runtime.distributed import destroy_distributed, init_distributed, is_rank0
from megaswift.runtime.save_dir import check_save, staged


def run(argv: list[str]) -> int:
    args, parallel, data, runtime = parse((ExportArgs, ParallelArgs, DataArgs, RuntimeArgs), argv,
                                          prog="megatron export")
    if parallel.context_parallel_size > 1:
        raise LayoutError(
            f"--context_parallel_size {parallel.context_parallel_size}: conversion does not split "
            "sequences and every context-parallel rank holds the same weights; export with "
            "--context_parallel_size 1 (checkpoints trained at any CP size load)")
    # before any work: --save must not be, hold or sit inside the input (--overwrite deletes it)
    out = check_save(args.save, {"--model": args.model, "--load": args.load, "--adapter_load": args.adapter_load,
                                 "--adapters": args.adapters[0] if args.adapters else None}, staged=True)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--save {out} already exists; remove it, choose another "
                              "directory, or pass --overwrite true")
    if args.to_cached_dataset:
        return _cached_dataset(args, data, out)
    if args.adapters:
        return _import_peft(args, parallel, runtime, out)
    if args.adapter_load:
        return _export_lora(args, parallel, runtime, out)
    # --to_hf --load Y [--model X]: Y's weights; config.json and tokenizer from X when given (a Megatron-SWIFT
    # checkpoint whose args.json names a model that is not here), else from the checkpoint
    source = resolve_source(args.model, None if args.to_mcore else args.load, args.trust_remote_code)
    hf_config = source.hf_config
    _check_layout(parallel, hf_config)
    model = source.model(args.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size)
    dtype = source.dtype(args.torch_dtype)
    reader = HFReader(source.dir) if args.to_mcore else None   # reads headers now: a corrupt file fails here
    init_distributed(parallel, resolve_runtime(runtime.transformer_impl, runtime.attention_backend))
    try:
        with staged(out, args.overwrite) as stage:
            ok = _convert(args, parallel, source, model, dtype, reader, stage)
        if is_rank0():
            log(f"wrote {out}")
    finally:
        destroy_distributed()
    return 0 if ok else 1


def _check_layout(parallel: ParallelArgs, hf_config) -> None:
    """The layout against the model, before any work."""
    from megaswift.converters import family_for
    from megaswift.model.config import check_layout

    family = family_for(hf_config)
    if family.num_experts(hf_config) and parallel.tensor_model_parallel_size > 1:
        parallel.sequence_parallel = True  # megatron-core builds MoE under TP only with SP; no weight changes
    check_layout(parallel, hf_config, family, training=False)


def _cached_dataset(args: ExportArgs, data: DataArgs, out: Path) -> int:
    """Tokenise once into a cached dataset (one process; --dataset_num_proc workers)."""
    from transformers import AutoTokenizer

    from megaswift.data.cached import write_cached_dataset

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model), trust_remote_code=args.trust_remote_code)
    with staged(out, overwrite=True) as stage:
        stats = write_cached_dataset(data, tokenizer, stage)
    log(f"wrote {out}: {json.dumps(stats.as_json())}")
    return 0


def _convert(args: ExportArgs, parallel: ParallelArgs, source: Source, model: HFModel, dtype: torch.dtype,
             reader, stage: Path) -> bool:
    from megaswift.converters.hf_folder import write_hf_folder
    from megaswift.model.builder import build_gpt_model
    from megaswift.model.config import transformer_config

    t0 = time.time()
    # Every weight is overwritten by the conversion: skip megatron's random initialisation.
    config = transformer_config(model.config, model.family, parallel.sizes(), dtype, perform_initialization=False)
    chunk = build_gpt_model(model.config, config, padded_vocab=model.dims.padded_vocab_size)
    if args.to_mcore:
        load_hf_weights([chunk], model.family, model.config, reader, model.dims)
        reader.close()  # unmap the HF files before the save allocates its buffers
        log(f"read HF weights from {source.dir} in {time.time() - t0:.1f}s")
        save_models([chunk], stage)
        if is_rank0():
            copy_side_files(source.dir, stage / HF_CONFIG)
            source.checkpoint_record(model, dtype, args.make_vocab_size_divisible_by, parallel,
                                     source_model=str(args.model)).write(stage)
        hf_dir = source.dir
    else:
        load_models([chunk], Path(args.load).expanduser())
        log(f"loaded MCore checkpoint {args.load} in {time.time() - t0:.1f}s")
        write_hf_folder([chunk], model.family, model.config, model.dims, dtype, stage, source.dir,
                        args.max_shard_size)
        hf_dir = stage
    log(f"converted in {time.time() - t0:.1f}s")
    if args.test_convert_precision:
        return _precision(chunk, config, model, hf_dir)
    return True


def _precision(chunk, config, model: HFModel, hf_dir: Path) -> bool:
    """Compare against transformers in float32 (MCore weights upcast in place)."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaswift.precision import compare, sample_token_ids

    chunk.float()
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir if (hf_dir / "tokenizer_config.json").exists()
                                                  else hf_dir / HF_CONFIG)
    except Exception:
        tokenizer = None
    samples = sample_token_ids(tokenizer, model.dims.vocab_size)
    hf_model = None
    if parallel_state.is_pipeline_last_stage():
        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    reports = compare(chunk, config, hf_model, samples, model.dims.vocab_size)
    for r in reports:
        log(r.line())
    return all(r.ok for r in reports)


# -- LoRA -------------------------------------------------------------------------------------------
@dataclass
class LoraRun:
    """What `--adapter_load` names: a LoRA run's checkpoint and the record that rebuilds its adapters."""
    root: Path
    record: CheckpointRecord
    tuner: TunerArgs
    seed: int

    @property
    def cfg(self) -> dict:
        return self.tuner.lora_config()

    def base(self) -> tuple[str | None, str | None]:
        """(--model, --load) the run started from, as its args.json recorded them."""
        model_args = self.record.flags.get("model_args") or {}
        return model_args.get("model") or self.record.source_model, model_args.get("load")


def read_lora_run(path: str) -> LoraRun:
    """The LoRA run under `--adapter_load`, or a one-line error naming the flag and the fix."""
    root = Path(path).expanduser()
    flag = f"--adapter_load {path}"
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} does not exist: pass a LoRA run's directory (the --save of "
                                "`megatron sft --train_type lora`, or an `--adapters ... --to_mcore true` export)")
    if not (root / ARGS).is_file():
        raise FileNotFoundError(f"{flag} has no {ARGS}: pass a LoRA run's directory (the --save of "
                                "`megatron sft --train_type lora`), not a checkpoint's iteration directory")
    try:
        record = CheckpointRecord.read(root)
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    tuner = record.flags.get("tuner")
    if not isinstance(tuner, dict) or tuner.get("train_type") != "lora":
        raise ValueError(f"{flag}: {root / ARGS} records no LoRA run (tuner.train_type lora): it is a full "
                         "checkpoint; export it with --load, or pass the --save of a --train_type lora run")
    known = {f.name for f in dataclasses.fields(TunerArgs)} - {"adapter_load"}
    try:
        args = TunerArgs(**{k: v for k, v in tuner.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{flag}: the LoRA record in {root / ARGS} is invalid ({e})") from None
    try:
        resolve(root)
    except CheckpointError as e:
        raise CheckpointError(f"{flag}: {e}") from None
    seed = (record.flags.get("train") or {}).get("seed", 42)
    return LoraRun(root, record, args, int(seed))


def _export_lora(args: ExportArgs, parallel: ParallelArgs, runtime: RuntimeArgs, out: Path) -> int:
    """`--adapter_load <run> --to_hf true [--merge_lora true]`: every check first, then the export."""
    from megaswift.model.hf import config_dtype, parse_dtype

    lora = read_lora_run(args.adapter_load)
    model_flag, load_flag = args.model, args.load
    if not (model_flag or load_flag):
        model_flag, load_flag = lora.base()
        if model_flag:
            load_flag = None
        if not (model_flag or load_flag):
            raise ValueError(f"--adapter_load {args.adapter_load}: its args.json names no base model; pass "
                             "--model <hf_dir> or --load <mcore_dir>")
        recorded = model_flag or load_flag
        if not Path(recorded).expanduser().exists() and (load_flag or recorded.startswith(("/", ".", "~"))):
            raise FileNotFoundError(f"--adapter_load {args.adapter_load}: its base {recorded} (from {ARGS}) does "
                                    "not exist here; pass --model <hf_dir> or --load <mcore_dir>")
        log(f"base model from {lora.root / ARGS}: "
            + (f"--model {model_flag}" if model_flag else f"--load {load_flag}"))
    source = resolve_source(model_flag, load_flag, args.trust_remote_code)
    hf_config = source.hf_config
    _check_layout(parallel, hf_config)
    rec = lora.record
    model = HFModel.from_config(hf_config, rec.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size,
                                rec.padded_vocab_size)
    base_flag = f"--model {model_flag}" if model_flag else f"--load {load_flag}"
    if model.family.name != rec.family:
        raise ValueError(f"{base_flag} is a {model.family.name} model, the LoRA run --adapter_load "
                         f"{args.adapter_load} trained a {rec.family}; pass the run's base model")
    if source.is_checkpoint and source.record.padded_vocab_size != rec.padded_vocab_size:
        raise ValueError(f"{base_flag} pads the vocab to {source.record.padded_vocab_size} rows, the LoRA run "
                         f"--adapter_load {args.adapter_load} to {rec.padded_vocab_size}; pass the HF base "
                         "with --model")
    dtype = parse_dtype(args.torch_dtype, parse_dtype(rec.torch_dtype, config_dtype(hf_config)))
    reader = HFReader(source.dir) if args.merge_lora and not source.is_checkpoint else None
    base_name = str(model_flag) if model_flag else (source.record.source_model or str(load_flag))
    init_distributed(parallel, resolve_runtime(runtime.transformer_impl, runtime.attention_backend))
    try:
        with staged(out, args.overwrite) as stage:
            ok = _convert_lora(args, parallel, source, model, dtype, reader, load_flag, lora, base_name, stage)
        if is_rank0():
            log(f"wrote {out}")
    finally:
        destroy_distributed()
    return 0 if ok else 1


def _convert_lora(args: ExportArgs, parallel: ParallelArgs, source: Source, model: HFModel, dtype: torch.dtype,
                  reader, load_flag, lora: LoraRun, base_name: str, stage: Path) -> bool:
    from megatron.core import parallel_state

    from megaswift.converters.adapters import prepare_peft_export, write_peft_folder
    from megaswift.converters.hf_folder import write_hf_folder
    from megaswift.model.builder import build_gpt_model
    from megaswift.model.config import transformer_config
    from megaswift.tuners import add_lora, set_trainable

    t0 = time.time()
    config = transformer_config(model.config, model.family, parallel.sizes(), dtype, perform_initialization=False)
    chunk = build_gpt_model(model.config, config, padded_vocab=model.dims.padded_vocab_size)
    if args.merge_lora:  # the frozen base matters only when merged: PEFT holds the trained tensors alone
        if reader is not None:
            load_hf_weights([chunk], model.family, model.config, reader, model.dims)
            reader.close()
        else:
            load_models([chunk], Path(load_flag).expanduser())
        log(f"loaded the base from {base_name} in {time.time() - t0:.1f}s")
    add_lora([chunk], lora.cfg, lora.seed)
    set_trainable([chunk], lora.tuner, parallel_state.get_pipeline_model_parallel_world_size())
    # PEFT's form is decided by the names alone: refuse what it cannot hold before reading tensors
    peft = None if args.merge_lora else prepare_peft_export([chunk], model.family, model.config, lora.cfg, base_name)
    load_models([chunk], lora.root, trainable_only=True)
    log(f"loaded the LoRA adapter from {lora.root}")
    if args.merge_lora:
        n = merge_lora([chunk])
        log(f"merged LoRA into {n} linears of this rank")
        write_hf_folder([chunk], model.family, model.config, model.dims, dtype, stage, source.dir,
                        args.max_shard_size)
        log(f"converted in {time.time() - t0:.1f}s")
        if args.test_convert_precision:
            return _precision(chunk, config, model, stage)
        return True
    write_peft_folder(peft, model.config, model.dims, dtype, stage, lora.cfg)
    log(f"wrote a PEFT LoRA adapter in {time.time() - t0:.1f}s")
    return True


def merge_lora(chunks: list) -> int:
    """Fold every LoRA adapter into its base weight and put the base linear back in its place, so
    the chunks are a plain model again (exported, saved or compared as one). Returns how many."""
    from megaswift.tuners.lora import LoraLinear

    n = 0
    for chunk in chunks:
        for name, module in list(chunk.named_modules()):
            if isinstance(module, LoraLinear):
                module.merge_()
                parent, _, leaf = name.rpartition(".")
                setattr(chunk.get_submodule(parent) if parent else chunk, leaf, module.base_layer)
                n += 1
    return n


def _import_peft(args: ExportArgs, parallel: ParallelArgs, runtime: RuntimeArgs, out: Path) -> int:
    """`--adapters <peft_dir> --to_mcore true`: a PEFT LoRA folder as a megaswift LoRA checkpoint."""
    from megaswift.converters.adapters import A, lora_config_from_peft, read_peft_folder
    from megaswift.model.hf import parse_dtype

    folder = read_peft_folder(args.adapters[0])
    model_flag = args.model
    if not model_flag:
        base = folder.base_name
        if not base or not Path(base).expanduser().is_dir():
            raise ValueError(f"--adapters {args.adapters[0]}: pass its base model with --model <hf_dir> (its "
                             f"base_model_name_or_path {base!r} is not a local directory)")
        model_flag = base
        log(f"base model from {folder.dir / 'adapter_config.json'}: --model {model_flag}")
    source = resolve_source(model_flag, None, args.trust_remote_code)
    hf_config = source.hf_config
    _check_layout(parallel, hf_config)
    model = source.model(args.make_vocab_size_divisible_by, parallel.tensor_model_parallel_size)
    cfg = lora_config_from_peft(folder, model.family, hf_config)
    tuner = TunerArgs(train_type="lora", **cfg)
    lora_dtype = next(t.dtype for k, t in sorted(folder.tensors.items()) if k.endswith(A))
    dtype = parse_dtype(args.torch_dtype, lora_dtype)
    init_distributed(parallel, resolve_runtime(runtime.transformer_impl, runtime.attention_backend))
    try:
        with staged(out, args.overwrite) as stage:
            _save_imported(args, parallel, source, model, dtype, folder, tuner, stage)
        if is_rank0():
            log(f"wrote {out}")
    finally:
        destroy_distributed()
    return 0


def _save_imported(args: ExportArgs, parallel: ParallelArgs, source: Source, model: HFModel, dtype: torch.dtype,
                   folder, tuner: TunerArgs, stage: Path) -> None:
    from megatron.core import parallel_state

    from megaswift.args.train import ModelArgs
    from megaswift.checkpointing import model_state_dict, save_state
    from megaswift.converters.adapters import load_peft_weights
    from megaswift.model.builder import build_gpt_model
    from megaswift.model.config import transformer_config
    from megaswift.tuners import add_lora, set_trainable

    t0 = time.time()
    config = transformer_config(model.config, model.family, parallel.sizes(), dtype, perform_initialization=False)
    chunk = build_gpt_model(model.config, config, padded_vocab=model.dims.padded_vocab_size)
    cfg = tuner.lora_config()
    add_lora([chunk], cfg, seed=0)   # every adapter tensor is overwritten from the PEFT folder
    set_trainable([chunk], tuner, parallel_state.get_pipeline_model_parallel_world_size())
    load_peft_weights([chunk], model.family, model.config, model.dims, folder, cfg)
    log(f"read the PEFT adapter {folder.dir} in {time.time() - t0:.1f}s")
    save_state(model_state_dict([chunk], trainable_only=True), stage, "release")
    if is_rank0():
        copy_side_files(source.dir, stage / HF_CONFIG)
        flags = {"mode": "export", "model_args": dataclasses.asdict(ModelArgs(model=str(source.dir))),
                 "tuner": dataclasses.asdict(tuner), "adapters": str(folder.dir)}
        source.checkpoint_record(model, dtype, args.make_vocab_size_divisible_by, parallel,
                                 source_model=str(source.dir), flags=flags).write(stage)
