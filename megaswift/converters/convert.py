"""Moving weights between an HF folder and this rank's megatron-core model chunks.

The engine knows nothing about any family: it matches each MCore parameter to the family's
declared mapping, runs the mapping's transform on full tensors and lets `sharding` cut or join
the TP pieces. Pipeline stages fall out of the global layer numbers of each chunk's layers.
Completeness is checked both ways: every MCore parameter has exactly one mapping, and across all
ranks every HF tensor is consumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.converters.family import Family, compile_patterns
from megaswift.converters.hf_io import CheckpointError, HFReader
from megaswift.converters.mappings import Mapping, ModelDims
from megaswift.converters.sharding import shard, unshard

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# HF tensors that carry nothing (derived buffers some old checkpoints saved).
_IGNORABLE = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    param: torch.nn.Parameter
    mcore_name: str          # with the global layer index
    mapping: Mapping
    layer: int | None


def targets(models, family: Family, hf_config) -> list[Target]:
    """Each parameter of this rank's chunks with its mapping; an unmapped parameter is an error."""
    patterns = compile_patterns(family.mappings(hf_config))
    out = []
    for model in models:
        for name, param in model.named_parameters():
            canonical, layer = name, None
            m = _LOCAL_LAYER.match(name)
            if m:
                layer = model.decoder.layers[int(m.group(1))].layer_number - 1
                canonical = f"decoder.layers.{layer}.{m.group(2)}"
            hits = [mp for rx, mp in patterns if rx.match(canonical)]
            if len(hits) != 1:
                raise CheckpointError(
                    f"MCore parameter {canonical} has {len(hits)} mappings in family "
                    f"{family.name!r} (needs exactly one); the family declaration is incomplete")
            out.append(Target(param, canonical, hits[0], layer))
    return out


def load_hf_weights(models, family: Family, hf_config, reader: HFReader, dims: ModelDims) -> None:
    """Fill this rank's chunks from the HF folder, reading only the tensors this rank needs."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    consumed: set[str] = set()
    with torch.no_grad():
        for t in targets(models, family, hf_config):
            names = t.mapping.hf_names(t.layer)
            full = t.mapping.to_mcore({r: reader.get(n) for r, n in names.items()}, dims)
            piece = shard(full, t.mapping.shard, tp_rank, tp_size)
            if piece.shape != t.param.shape:
                raise CheckpointError(
                    f"{t.mcore_name}: HF tensors {sorted(names.values())} give shape "
                    f"{tuple(piece.shape)} on TP rank {tp_rank}, the model expects "
                    f"{tuple(t.param.shape)}; config.json does not match the weights")
            t.param.data.copy_(piece)
            consumed.update(names.values())
    _check_all_consumed(reader, consumed, hf_config)


def _check_all_consumed(reader: HFReader, consumed: set[str], hf_config) -> None:
    everyone = [consumed]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, consumed)
    used = set().union(*everyone)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    left = [k for k in reader.keys()
            if k not in used and not _IGNORABLE.match(k) and not (tied and k == "lm_head.weight")]
    if left:
        raise CheckpointError(
            f"{len(left)} HF tensor(s) in {reader.dir} have no MCore counterpart, e.g. "
            f"{left[:5]}; the checkpoint does not match its config.json model_type or uses a "
            "feature megaswift does not convert")


def export_hf_tensors(models, family: Family, hf_config, dims: ModelDims
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this rank's chunks.

    Every TP rank must iterate (the TP pieces are all-gathered); only TP rank 0 of the first
    data-parallel replica yields, so each tensor is written once.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    writer = (parallel_state.get_tensor_model_parallel_rank() == 0
              and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for t in targets(models, family, hf_config):
        local = t.param.detach()
        if tp_size > 1:
            parts = [torch.empty_like(local) for _ in range(tp_size)]
            dist.all_gather(parts, local.contiguous(), group=tp_group)
        else:
            parts = [local]
        if not writer or (tied and t.mcore_name == "output_layer.weight"):
            continue
        names = t.mapping.hf_names(t.layer)
        for role, tensor in t.mapping.to_hf(unshard(parts, t.mapping.shard), dims).items():
            yield names[role], tensor.cpu()
