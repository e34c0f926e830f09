"""Writing an HF model folder from this rank's megatron-core chunks: weights streamed into
safetensors shards (one writer per rank that holds tensors to write: a pipeline stage's first
tensor-parallel rank, and each expert-parallel rank for its own experts; numbered by rank 0), the model's side files
(config, generation config, tokenizer, chat template) and config.json's dtype."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.converters.convert import export_hf_tensors
from megaswift.converters.hf_io import ShardedWriter, copy_side_files, finish_shards, parse_size


def write_hf_folder(chunks: list, family, hf_config, dims, dtype: torch.dtype, out: Path, side_files: Path,
                    max_shard_size: str | int) -> None:
    """Collective over every rank: `out` holds a complete HF folder when it returns."""
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    rank = dist.get_rank()
    writer = ShardedWriter(out, parse_size(max_shard_size), tag=f"{rank:05d}")
    for name, tensor in export_hf_tensors(chunks, family, hf_config, dims, dtype=dtype):
        writer.add(name, tensor)
    writer.flush()
    files = [((pp_rank, rank), writer.files)]
    if dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, files)
        files = [f for g in gathered for f in g]
    if dist.get_rank() == 0:
        ordered = [f for _, fs in sorted(files, key=lambda x: x[0]) for f in fs]
        finish_shards(out, ordered)
        copy_side_files(side_files, out)
        set_config_dtype(out / "config.json", dtype)
    dist.barrier()  # other ranks may read the folder next (precision check)


def set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    cfg = json.loads(path.read_text())
    key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
    cfg[key] = str(dtype).removeprefix("torch.")  # transformers' spelling: "bfloat16"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
