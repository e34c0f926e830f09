"""`megatron export`: HF -> MCore (`--to_mcore`) and MCore -> HF (`--to_hf`), at any TP/PP layout.

Output is staged in a hidden sibling directory and renamed into place only when complete, so a
failed conversion leaves no partial `--save`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megaswift.args.data import DataArgs
from megaswift.args.export import ExportArgs
from megaswift.args.parallel import LayoutError, ParallelArgs
from megaswift.args.parser import parse
from megaswift.args.runtime import RuntimeArgs
from megaswift.checkpointing import ARGS, HF_CONFIG, load_models, read_args, save_models
from megaswift.converters.convert import export_hf_tensors, load_hf_weights
from megaswift.converters.hf_io import HFReader, ShardedWriter, finish_shards, parse_size
from megaswift.logging_utils import log
from megaswift.model.config import num_kv_heads
from megaswift.model.hf import (HFModel, config_dtype, copy_side_files, dtype_name, load_hf_config,
                                parse_dtype, resolve_model_dir)
from megaswift.runtime.context import resolve as resolve_runtime
from megaswift.runtime.distributed import destroy_distributed, init_distributed, is_rank0
from megaswift.runtime.save_dir import check_save


def run(argv: list[str]) -> int:
    args, parallel, data, runtime = parse((ExportArgs, ParallelArgs, DataArgs, RuntimeArgs), argv,
                                          prog="megatron export")
    if parallel.context_parallel_size > 1:
        raise LayoutError(
            f"--context_parallel_size {parallel.context_parallel_size}: conversion does not split "
            "sequences and every context-parallel rank holds the same weights; export with "
            "--context_parallel_size 1 (checkpoints trained at any CP size load)")
    # before any work: --save must not be, hold or sit inside the input (--overwrite deletes it)
    out = check_save(args.save, {"--model": args.model, "--load": args.load}, staged=True)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--save {out} already exists; remove it, choose another "
                              "directory, or pass --overwrite true")
    if args.to_cached_dataset:
        return _cached_dataset(args, data, out)
    src, hf_config, record = _source(args)
    parallel.validate_model(num_layers=hf_config.num_hidden_layers,
                            num_attention_heads=hf_config.num_attention_heads,
                            num_query_groups=num_kv_heads(hf_config))
    model = HFModel.from_config(hf_config, record["make_vocab_size_divisible_by"],
                                parallel.tensor_model_parallel_size, record.get("padded_vocab_size"))
    dtype = parse_dtype(args.torch_dtype, parse_dtype(record.get("torch_dtype"), config_dtype(hf_config)))
    reader = HFReader(src) if args.to_mcore else None   # reads headers now: a corrupt file fails here
    init_distributed(parallel, resolve_runtime(runtime.transformer_impl, runtime.attention_backend))
    stage = _staging_dir(out)
    try:
        ok = _convert(args, parallel, src, model, dtype, reader, stage, record)
        _publish(stage, out, args.overwrite)
    except BaseException:
        if is_rank0():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        destroy_distributed()
    return 0 if ok else 1


def _cached_dataset(args: ExportArgs, data: DataArgs, out: Path) -> int:
    """Tokenise once into a cached dataset (one process; --dataset_num_proc workers)."""
    from transformers import AutoTokenizer

    from megaswift.data.cached import write_cached_dataset

    src = resolve_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=args.trust_remote_code)
    stage = out.parent / f".{out.name}.partial-{int(time.time() * 1e3)}"
    stage.mkdir(parents=True)
    try:
        stats = write_cached_dataset(data, tokenizer, stage)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log(f"wrote {out}: {json.dumps(stats.as_json())}")
    return 0


def _source(args: ExportArgs):
    """(source dir, HF config, record) for either direction; fails before any work is done."""
    if args.to_mcore:
        src = resolve_model_dir(args.model)
        record = {"make_vocab_size_divisible_by": args.make_vocab_size_divisible_by}
        return src, load_hf_config(src, args.trust_remote_code), record
    src = Path(args.load).expanduser()
    record = read_args(src)
    return src, load_hf_config(src / HF_CONFIG, args.trust_remote_code), record


def _staging_dir(out: Path) -> Path:
    name = [f".{out.name}.partial-{int(time.time() * 1e3)}"]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    stage = out.parent / name[0]
    if is_rank0():
        stage.mkdir(parents=True)
    dist.barrier()
    return stage


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    dist.barrier()
    if is_rank0():
        if out.exists() and overwrite:
            shutil.rmtree(out)
        stage.rename(out)
        log(f"wrote {out}")
    dist.barrier()


def _convert(args, parallel, src, model: HFModel, dtype, reader, stage: Path, record) -> bool:
    from megaswift.model.builder import build_gpt_model
    from megaswift.model.config import transformer_config

    t0 = time.time()
    # Every weight is overwritten by the conversion: skip megatron's random initialisation.
    config = transformer_config(model.config, model.family, parallel, dtype, perform_initialization=False)
    chunk = build_gpt_model(model.config, config, padded_vocab=model.dims.padded_vocab_size)
    if args.to_mcore:
        load_hf_weights([chunk], model.family, model.config, reader, model.dims)
        reader.close()  # unmap the HF files before the save allocates its buffers
        log(f"read HF weights from {src} in {time.time() - t0:.1f}s")
        save_models([chunk], stage)
        if is_rank0():
            copy_side_files(src, stage / HF_CONFIG)
            _write_args(stage, model, dtype, parallel, args)
        hf_dir = src
    else:
        load_models([chunk], src)
        log(f"loaded MCore checkpoint {src} in {time.time() - t0:.1f}s")
        _write_hf(chunk, model, dtype, stage, src, args)
        hf_dir = stage
    log(f"converted in {time.time() - t0:.1f}s")
    if args.test_convert_precision:
        return _precision(chunk, config, model, hf_dir)
    return True


def _write_args(stage: Path, model: HFModel, dtype, parallel: ParallelArgs, args: ExportArgs) -> None:
    record = {
        "megaswift_checkpoint": 1,
        "family": model.family.name,
        "torch_dtype": dtype_name(dtype),
        "padded_vocab_size": model.dims.padded_vocab_size,
        "make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
        "saved_with": {"tensor_model_parallel_size": parallel.tensor_model_parallel_size,
                       "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size},
        "source_model": str(args.model),
    }
    (stage / ARGS).write_text(json.dumps(record, indent=2) + "\n")


def _write_hf(chunk, model: HFModel, dtype, stage: Path, src: Path, args: ExportArgs) -> None:
    """Each pipeline stage's writer rank streams its tensors; rank 0 numbers the files."""
    from megatron.core import parallel_state

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    writer = ShardedWriter(stage, parse_size(args.max_shard_size), tag=f"{pp_rank:03d}")
    for name, tensor in export_hf_tensors([chunk], model.family, model.config, model.dims):
        writer.add(name, tensor.to(dtype))
    writer.flush()
    files = [(pp_rank, writer.files)]
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        files = [f for g in gathered for f in g]
    if is_rank0():
        ordered = [f for _, fs in sorted(files, key=lambda x: x[0]) for f in fs]
        finish_shards(stage, ordered)
        copy_side_files(src / HF_CONFIG, stage)
        _set_config_dtype(stage / "config.json", dtype)
    dist.barrier()  # other ranks may read the folder next (precision check)


def _set_config_dtype(path: Path, dtype) -> None:
    cfg = json.loads(path.read_text())
    key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
    cfg[key] = dtype_name(dtype)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


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
