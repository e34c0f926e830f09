"""Moving weights between an HF folder and this rank's megatron-core model chunks.

The engine knows nothing about any family: it canonicalises each MCore parameter name (wrappers
removed, adapter parameters set aside), matches it to the family's declared mapping, turns local
layer and expert numbers into global ones, runs the mapping's transform on full tensors and lets
`sharding` cut or join the pieces over the mapping's axis (TP or expert TP). Pipeline stages and
expert-parallel ranks fall out of the global numbers of the layers and experts each rank holds.
Completeness is checked both ways: every MCore parameter has exactly one mapping, and across all
ranks every HF tensor is consumed (but those the family declares dropped, counted and logged).

Persistent buffers that hold checkpoint state (megatron's MoE `router.expert_bias`, DeepSeek-V3's
`e_score_correction_bias`) are converted like parameters when a mapping names them; the other
buffers are derived (RoPE tables, token counters) and left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.converters.family import Family
from megaswift.converters.hf_io import CheckpointError, HFReader
from megaswift.converters.mappings import Mapping, ModelDims
from megaswift.converters.names import canonical, compile_pattern, fill
from megaswift.converters.sharding import Axis, Placement, shard, unshard
from megaswift.logging_utils import log

# HF tensors that carry nothing (derived buffers some old checkpoints saved).
_IGNORABLE = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class Target:
    param: torch.Tensor      # a parameter, or a persistent buffer a mapping names
    mcore_name: str          # canonical, with the global layer and expert indices
    mapping: Mapping         # for an adapter parameter: the mapping of the weight it adapts
    layer: int | None
    expert: int | None = None
    adapter: str | None = None  # the adapter's part of the name ("lora_A.weight"), else None
    name: str = ""              # the parameter's own (local, wrapped) name in its chunk

    def hf_names(self) -> dict[str, str]:
        return self.mapping.hf_names(self.layer, self.expert)


def current_placement() -> Placement:
    """This rank's place on the TP, expert-TP and EP groups megatron set up."""
    ps = parallel_state
    return Placement(
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()))


def targets(models, family: Family, hf_config, placement: Placement) -> list[Target]:
    """Each parameter of this rank's chunks with its mapping; an unmapped parameter is an error.

    Adapter parameters come back too (`Target.adapter` set), with the mapping of the weight they
    adapt; the base conversion skips them.
    """
    patterns = [(compile_pattern(m.mcore), m) for m in family.mappings(hf_config)]
    out = []
    for model in models:
        for name, param in _parameters_and_mapped_buffers(model, patterns):
            base = canonical(name)
            hits = [(hit, mapping) for rx, mapping in patterns if (hit := rx.match(base.name))]
            if len(hits) != 1:
                raise CheckpointError(
                    f"MCore parameter {base.name} has {len(hits)} mappings in family "
                    f"{family.name!r} (needs exactly one); the family declaration is incomplete")
            (match, mapping), = hits
            layer, expert = _global_indices(model, match, placement)
            out.append(Target(param, fill(mapping.mcore, layer, expert), mapping, layer, expert,
                              base.adapter, name))
    return out


def _parameters_and_mapped_buffers(model, patterns) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, and each persistent buffer some mapping names (state such as the router's
    expert bias; unnamed buffers are derived and not converted)."""
    buffers = []
    for module_name, module in model.named_modules():
        for leaf, buf in module.named_buffers(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            if (buf is not None and leaf not in module._non_persistent_buffers_set
                    and any(rx.match(canonical(name).name) for rx, _ in patterns)):
                buffers.append((name, buf))
    return [*model.named_parameters(), *buffers]


def _global_indices(model, match: re.Match, placement: Placement) -> tuple[int | None, int | None]:
    """The global layer and expert numbers of a name matched with this chunk's local numbers."""
    found = match.groupdict()
    layer = expert = None
    if found.get("layer") is not None:
        layer = model.decoder.layers[int(found["layer"])].layer_number - 1
    if found.get("expert") is not None:
        expert = placement.global_expert(int(found["expert"]), model.config.num_moe_experts)
    return layer, expert


def load_hf_weights(models, family: Family, hf_config, reader: HFReader, dims: ModelDims, *,
                    placement: Placement | None = None) -> None:
    """Fill this rank's chunks from the HF folder, reading only the tensors this rank needs.

    `placement` defaults to this rank's place in megatron's groups.
    """
    placement = placement or current_placement()
    consumed: set[str] = set()
    with torch.no_grad():
        for t in targets(models, family, hf_config, placement):
            if t.adapter:
                continue
            names = t.hf_names()
            full = t.mapping.to_mcore({r: reader.get(n) for r, n in names.items()}, dims)
            rank, size = placement.on(t.mapping.axis)
            piece = shard(full, t.mapping.shard, rank, size, t.mapping.axis)
            if piece.shape != t.param.shape:
                raise CheckpointError(
                    f"{t.mcore_name}: HF tensors {sorted(names.values())} give shape "
                    f"{tuple(piece.shape)} on {t.mapping.axis.value} rank {rank}, the model "
                    f"expects {tuple(t.param.shape)}; config.json does not match the weights")
            t.param.data.copy_(piece)
            consumed.update(names.values())
    _check_all_consumed(reader, consumed, family, hf_config)


def _check_all_consumed(reader: HFReader, consumed: set[str], family: Family, hf_config) -> None:
    everyone = [consumed]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, consumed)
    used = set().union(*everyone)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    left = [k for k in reader.keys()
            if k not in used and not _IGNORABLE.match(k) and not (tied and k == "lm_head.weight")]
    dropped = family.dropped(hf_config)
    if dropped:
        pattern, why = dropped
        skipped = [k for k in left if re.match(pattern, k)]
        if skipped:
            log(f"skipped {len(skipped)} HF tensor(s) of {why}")
        left = [k for k in left if not re.match(pattern, k)]
    if left:
        raise CheckpointError(
            f"{len(left)} HF tensor(s) in {reader.dir} have no MCore counterpart, e.g. "
            f"{left[:5]}; the checkpoint does not match its config.json model_type or uses a "
            "feature megaswift does not convert")


# The group each axis all-gathers over on export.
_GROUPS = {Axis.TP: parallel_state.get_tensor_model_parallel_group,
           Axis.EXPERT_TP: parallel_state.get_expert_tensor_parallel_group}


def export_hf_tensors(models, family: Family, hf_config, dims: ModelDims, *,
                      placement: Placement | None = None,
                      dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for this rank's chunks.

    Every rank of a parameter's axis group must iterate (its pieces are all-gathered there); only
    rank 0 of that group in the first data-parallel replica yields, so each tensor is written
    once. Routed experts differ between expert-parallel ranks: each of them writes its own.
    `dtype`: the dtype written (mappings that keep float32 excepted); None keeps the model's.
    `placement` defaults to this rank's place in megatron's groups.
    """
    placement = placement or current_placement()
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for t in targets(models, family, hf_config, placement):
        if t.adapter:
            continue
        full = gather_full(t.param, t.mapping, placement)
        if full is None or (tied and t.mcore_name == "output_layer.weight"):
            continue
        names = t.hf_names()
        cast = dtype if dtype is not None and not t.mapping.keeps_float32 else None
        for role, tensor in t.mapping.to_hf(full, dims).items():
            yield names[role], (tensor.to(cast) if cast is not None else tensor).cpu()


def gather_full(param: torch.Tensor, mapping: Mapping, placement: Placement) -> torch.Tensor | None:
    """The full tensor of `param` (split as `mapping` says) on the rank that writes it: rank 0 of
    the mapping's axis group in the first data-parallel replica; None on every other rank.
    Collective over the axis group: each of its ranks must call it, in the same order."""
    local = param.detach()
    rank, size = placement.on(mapping.axis)
    parts = [local]
    if size > 1:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=_GROUPS[mapping.axis]())
    if rank != 0 or _replica(mapping.axis) != 0:
        return None
    return unshard(parts, mapping.shard)


def _replica(axis: Axis) -> int:
    """This rank's data-parallel replica number for parameters split over `axis`."""
    if axis is Axis.EXPERT_TP:
        return parallel_state.get_expert_data_parallel_rank()
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)
