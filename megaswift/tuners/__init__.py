"""Which parameters train: LoRA grafted onto the model chunks (`--train_type lora`), or full training
with Megatron-SWIFT's freezing flags.

Names given by users (``--target_regex``, ``--freeze_parameters``, ``--modules_to_save`` ...) are
matched against *global* names: ``decoder.layers.<global layer>...`` and a routed expert's
``mlp.experts.local_experts.<global expert>...``, the same on every pipeline and expert-parallel
layout (in one process they are the module names megatron-core gives).

On MoE models `all-linear` covers the routed experts' linear_fc1/linear_fc2 (one adapter per
expert) and the shared expert's; the router is no linear of megatron's and `all-router` is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from megaswift.args.tuner import TunerArgs
from megaswift.tuners.lora import LoraLinear, parallel_mode

# The linears of the decoder layer spec (`model/spec.py`, and TE's): what --target_modules can name.
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)(?=\.|$)")
_LOCAL_EXPERT = re.compile(r"\.experts\.local_experts\.(\d+)(?=\.|$)")
ROUTER_REFUSED = ("--target_modules all-router: LoRA on MoE routers is not supported (megatron's TopKRouter "
                  "is no tensor-parallel linear LoRA can wrap); train the routers in full with "
                  "--modules_to_save router, or leave all-router out")
_EMBEDDINGS = ("embedding.word_embeddings", "output_layer")


def global_name(chunk: nn.Module, name: str) -> str:
    """`name` of a module or parameter of `chunk` with the global decoder layer and expert numbers."""
    e = _LOCAL_EXPERT.search(name)
    if e:  # SequentialMLP: expert-parallel rank r holds experts r * local .. (r + 1) * local - 1
        experts = chunk.get_submodule(name[:e.start()] + ".experts")
        first = experts.ep_group.rank() * experts.num_local_experts
        name = f"{name[:e.start()]}.experts.local_experts.{first + int(e.group(1))}{name[e.end():]}"
    m = _LOCAL_LAYER.match(name)
    if not m:
        return name
    layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1
    return f"decoder.layers.{layer}{name[m.end():]}"


def _suffix_match(name: str, wanted) -> bool:
    return any(name == w or name.endswith("." + w) for w in wanted)


def _lora_candidates(chunk: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(local name, global name, module) of every linear LoRA can wrap: the decoder's parallel linears."""
    return [(n, global_name(chunk, n), m) for n, m in chunk.named_modules()
            if n.startswith("decoder.") and parallel_mode(m) is not None and not isinstance(m, LoraLinear)]


def _lora_targets(chunk, cfg: dict) -> list[tuple[str, str, nn.Module]]:
    found = _lora_candidates(chunk)
    if cfg.get("target_regex"):
        rx = re.compile(cfg["target_regex"])
        return [c for c in found if rx.fullmatch(c[1])]
    wanted = [t for t in cfg["target_modules"] if t not in ("all-linear", "all-router")]
    if "all-linear" in cfg["target_modules"]:
        return found
    return [c for c in found if _suffix_match(c[1], wanted)]


def check_targets(target_modules: list[str]) -> None:
    """Before any work: every --target_modules name is a linear of the layer spec (or all-linear)."""
    if "all-router" in target_modules:
        raise ValueError(ROUTER_REFUSED)
    unknown = [t for t in target_modules if t not in ("all-linear", "all-router")
               and not any(n == t or n.endswith("." + t) for n in LINEARS)]
    if unknown:
        names = " ".join(n.rsplit(".", 1)[-1] for n in LINEARS)
        raise ValueError(f"--target_modules {' '.join(unknown)}: no such linear in the model; its linears are "
                         f"{names} (megatron's names; or all-linear)")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def add_lora(chunks: list, cfg: dict, seed: int) -> int:
    """Wrap the targeted linears of every chunk in `LoraLinear`; returns how many on this rank.

    `cfg` is `TunerArgs.lora_config()` (as a LoRA run's args.json keeps it). A target list that
    names no linear of the model is an error on every rank (pipeline stages see different layers,
    so the check is on the names, not on this rank's share).
    """
    if not cfg.get("target_regex") and "all-router" in cfg["target_modules"]:
        raise ValueError(ROUTER_REFUSED)
    wrapped = 0
    names = set()
    for chunk in chunks:
        names.update(re.sub(r"\.\d+\.", ".*.", g) for _, g, _ in _lora_candidates(chunk))
        for local, glob, module in _lora_targets(chunk, cfg):
            _set_submodule(chunk, local, LoraLinear(
                module, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
                use_rslora=cfg["use_rslora"], key=glob, seed=seed))
            wrapped += 1
    if not cfg.get("target_regex"):
        known = {n.rsplit(".", 1)[-1] for n in names}
        unknown = [t for t in cfg["target_modules"] if t not in ("all-linear", "all-router")
                   and not any(n == t or n.endswith("." + t) for n in names | known)]
        if unknown:
            raise ValueError(f"--target_modules {' '.join(unknown)}: no such linear in the model; "
                             f"its linears are {', '.join(sorted(known))} (or all-linear)")
    return wrapped


def _modules_to_save(chunk: nn.Module, wanted: list[str]) -> set[str]:
    """Local parameter names of the modules in `wanted` (tied embeddings count as one module)."""
    if not wanted:
        return set()
    tied = bool(getattr(chunk, "share_embeddings_and_output_weights", False))
    names = set(wanted)
    if tied and any(_suffix_match(e, names) for e in _EMBEDDINGS):
        names.update(_EMBEDDINGS)
    out = set()
    for n, m in chunk.named_modules():
        if n and _suffix_match(global_name(chunk, n), names):
            out.update(f"{n}.{p}" for p, _ in m.named_parameters())
    return out


def set_trainable(chunks: list, tuner: TunerArgs, pipeline_parallel: int = 1) -> None:
    """requires_grad for every parameter: LoRA's adapters (+ modules_to_save, + biases with
    --lora_bias all), or full training minus the freezing flags."""
    if tuner.lora:
        for chunk in chunks:
            save = _modules_to_save(chunk, tuner.modules_to_save)
            for n, p in chunk.named_parameters():
                p.requires_grad_(".lora_A." in n or ".lora_B." in n or n in save
                                 or (tuner.lora_bias == "all" and n.endswith(".bias")))
        return
    if tuner.freeze_parameters_ratio and pipeline_parallel > 1:
        raise ValueError("--freeze_parameters_ratio needs --pipeline_model_parallel_size 1 (it counts "
                         "parameters from the embedding up, across the whole model)")
    for chunk in chunks:
        params = [(global_name(chunk, n), p) for n, p in chunk.named_parameters()]
        frozen_upto = int(sum(p.numel() for _, p in params) * tuner.freeze_parameters_ratio)
        seen = 0
        for n, p in params:
            freeze = seen + p.numel() <= frozen_upto or (tuner.freeze_parameters_ratio == 1.0)
            seen += p.numel()
            freeze |= any(n.startswith(x) for x in tuner.freeze_parameters)
            if tuner.freeze_parameters_regex:
                freeze |= bool(re.search(tuner.freeze_parameters_regex, n))
            train = any(n.startswith(x) for x in tuner.trainable_parameters) or bool(
                tuner.trainable_parameters_regex and re.search(tuner.trainable_parameters_regex, n))
            p.requires_grad_(train or not freeze)


def trainable_names(chunk: nn.Module) -> set[str]:
    return {n for n, p in chunk.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class ParamCounts:
    trainable: int
    total: int

    def line(self) -> str:
        return (f"trainable parameters: {self.trainable:,} of {self.total:,} "
                f"({100.0 * self.trainable / max(self.total, 1):.4f}%)")


def count_parameters(chunks: list) -> ParamCounts:
    """Trainable and total parameters of the whole model, each weight counted once: TP shards are
    summed over the TP group, TP-replicated ones counted on TP rank 0, stages summed over PP;
    routed experts (megatron marks them `allreduce=False`) likewise over expert-TP, and summed
    over expert-parallel ranks, each of which holds its own experts."""
    from megatron.core import parallel_state as ps

    from megaswift.runtime.distributed import device

    dense = torch.zeros(2, dtype=torch.float64, device=device())
    experts = torch.zeros(2, dtype=torch.float64, device=device())
    tp_rank, etp_rank = ps.get_tensor_model_parallel_rank(), ps.get_expert_tensor_parallel_rank()
    for chunk in chunks:
        for n, p in chunk.named_parameters():
            expert = getattr(p, "allreduce", True) is False
            if not getattr(p, "tensor_model_parallel", False) and (etp_rank if expert else tp_rank) != 0:
                continue  # a copy of a weight another rank of the group counts
            if n == "output_layer.weight" and getattr(chunk, "share_embeddings_and_output_weights", False):
                continue  # the last stage's copy of the tied embedding
            local = experts if expert else dense
            local[1] += p.numel()
            if p.requires_grad:
                local[0] += p.numel()
    for local, groups in ((dense, (ps.get_tensor_model_parallel_group,)),
                          (experts, (ps.get_expert_tensor_parallel_group, ps.get_expert_model_parallel_group))):
        for group in groups + (ps.get_pipeline_model_parallel_group,):
            if torch.distributed.get_world_size(group()) > 1:
                torch.distributed.all_reduce(local, group=group())
    local = dense + experts
    return ParamCounts(int(local[0].item()), int(local[1].item()))
