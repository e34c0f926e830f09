"""`megatron export`: HF -> MCore (`--to_mcore`), MCore -> HF (`--to_hf`) at any TP/PP layout,
and `--to_cached_dataset` (tokenise once for later runs).

Output is staged in a hidden sibling directory and renamed into place only when complete
(`runtime/save_dir.staged`), so a failed conversion leaves no partial `--save`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megaswift.args.data import DataArgs
from megaswift.args.export import ExportArgs
from megaswift.args.parallel import LayoutError, ParallelArgs
from megaswift.args.parser import parse
from megaswift.args.runtime import RuntimeArgs
from megaswift.checkpointing import HF_CONFIG, load_models, save_models
from megaswift.converters.convert import load_hf_weights
from megaswift.converters.hf_io import HFReader, copy_side_files
from megaswift.logging_utils import log
from megaswift.model.config import num_kv_heads
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
    out = check_save(args.save, {"--model": args.model, "--load": args.load}, staged=True)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--save {out} already exists; remove it, choose another "
                              "directory, or pass --overwrite true")
    if args.to_cached_dataset:
        return _cached_dataset(args, data, out)
    source = resolve_source(args.model if args.to_mcore else None, args.load, args.trust_remote_code)
    hf_config = source.hf_config
    parallel.validate_model(num_layers=hf_config.num_hidden_layers,
                            num_attention_heads=hf_config.num_attention_heads,
                            num_query_groups=num_kv_heads(hf_config))
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
