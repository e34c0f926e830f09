"""Parallel layout flags (Megatron-LM spelling) and their checks against world size and model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaswift.context_parallel import pad_multiple


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the flags and the fix."""


@dataclass(kw_only=True)
class ParallelArgs:
    tensor_model_parallel_size: int = field(default=1, metadata={"help": "Tensor parallel size (TP)."})
    pipeline_model_parallel_size: int = field(default=1, metadata={"help": "Pipeline stages (PP)."})
    virtual_pipeline_model_parallel_size: Optional[int] = field(
        default=None, metadata={"help": "Virtual pipeline stages per rank (interleaved 1F1B)."})
    context_parallel_size: int = field(default=1, metadata={"help": "Context parallel size (CP)."})
    expert_model_parallel_size: int = field(default=1, metadata={"help": "Expert parallel size (EP)."})
    expert_tensor_parallel_size: Optional[int] = field(
        default=None, metadata={"help": "Tensor parallel size inside experts (default: TP)."})
    sequence_parallel: bool = field(
        default=False, metadata={"help": "Shard activations along the sequence over TP ranks."})
    decoder_first_pipeline_num_layers: Optional[int] = field(
        default=None, metadata={"help": "Layers on the first pipeline stage (the rest split evenly)."})
    decoder_last_pipeline_num_layers: Optional[int] = field(
        default=None, metadata={"help": "Layers on the last pipeline stage (the rest split evenly)."})

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise LayoutError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            self.sequence_parallel = False  # as Megatron-LM: SP is a no-op without TP

    @property
    def model_parallel_size(self) -> int:
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def sequence_multiple(self) -> int:
        """What every micro-batch's sequence length must be a multiple of (:func:`pad_multiple`)."""
        return pad_multiple(self.tensor_model_parallel_size, self.sequence_parallel, self.context_parallel_size)

    def sizes(self):
        """The layout as plain sizes (`megaswift.model.config.ParallelSizes`), for the model config."""
        from megaswift.model.config import ParallelSizes  # megatron-core loads only when a model is built

        return ParallelSizes(
            tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
            vpp=self.virtual_pipeline_model_parallel_size, cp=self.context_parallel_size,
            ep=self.expert_model_parallel_size, etp=self.expert_tensor_parallel_size,
            sp=self.sequence_parallel, first_stage_layers=self.decoder_first_pipeline_num_layers,
            last_stage_layers=self.decoder_last_pipeline_num_layers)

    def data_parallel_size(self, world_size: int) -> int:
        self.validate_world_size(world_size)
        return world_size // self.model_parallel_size

    def validate_world_size(self, world_size: int) -> None:
        mp = self.model_parallel_size
        if world_size % mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by --tensor_model_parallel_size "
                f"{self.tensor_model_parallel_size} x --pipeline_model_parallel_size "
                f"{self.pipeline_model_parallel_size} x --context_parallel_size "
                f"{self.context_parallel_size} = {mp}; change the sizes or NPROC_PER_NODE")
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        stage = world_size // self.pipeline_model_parallel_size
        if (ep * (etp or 1)) > 1 and stage % (ep * (etp or self.tensor_model_parallel_size)):
            etp = etp or self.tensor_model_parallel_size
            raise LayoutError(
                f"--expert_model_parallel_size {ep} x --expert_tensor_parallel_size {etp} = {ep * etp} "
                f"does not divide the {stage} ranks of one pipeline stage (world size {world_size} / "
                f"--pipeline_model_parallel_size {self.pipeline_model_parallel_size}); change the sizes "
                "or NPROC_PER_NODE")

    def validate_model(self, *, num_layers: int, num_attention_heads: int,
                       num_query_groups: int) -> None:
        """Check the layout against the model's shape; raise LayoutError naming the flag."""
        tp = self.tensor_model_parallel_size
        if num_attention_heads % tp:
            raise LayoutError(
                f"--tensor_model_parallel_size {tp} does not divide num_attention_heads "
                f"{num_attention_heads}; use a divisor of {num_attention_heads}")
        if num_query_groups % tp:
            raise LayoutError(
                f"--tensor_model_parallel_size {tp} does not divide num_key_value_heads "
                f"{num_query_groups}; use a divisor of {num_query_groups}")
        pp = self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size or 1
        first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
        if first is not None or last is not None:
            self._validate_uneven(num_layers, pp, vpp, first, last)
            return
        if pp * vpp <= num_layers and num_layers % (pp * vpp) == 0:
            return
        # the sizes that work, so the fix is in the message (or uneven first/last stages)
        sizes = [str(p) for p in range(1, num_layers + 1) if num_layers % (p * vpp) == 0]
        fix = (f"use --pipeline_model_parallel_size {', '.join(sizes[:-1])} or {sizes[-1]}" if len(sizes) > 1
               else f"use --pipeline_model_parallel_size {sizes[0]}" if sizes
               else "lower --virtual_pipeline_model_parallel_size")
        fix += f" (with {vpp} virtual stages)" if vpp > 1 and sizes else ""
        if pp * vpp > num_layers:
            raise LayoutError(
                f"--pipeline_model_parallel_size {pp} x virtual stages {vpp} exceeds the "
                f"model's {num_layers} layers; {fix}")
        raise LayoutError(
            f"num_layers {num_layers} is not divisible by --pipeline_model_parallel_size {pp}"
            + (f" x --virtual_pipeline_model_parallel_size {vpp}" if vpp > 1 else "")
            + f"; {fix}" + (", or uneven stages with --decoder_first_pipeline_num_layers / "
                            "--decoder_last_pipeline_num_layers" if vpp == 1 else ""))

    def validate_experts(self, *, num_experts: int, topk: int | None, moe_ffn_hidden_size: int | None,
                         training: bool) -> None:
        """Check the expert layout against an MoE model (or refuse expert parallel for a dense one)."""
        ep, etp = self.expert_model_parallel_size, self.expert_tensor_parallel_size
        if etp is not None and etp < 1:
            raise LayoutError(f"--expert_tensor_parallel_size must be >= 1, got {etp}")
        if not num_experts:
            if ep > 1 or (etp or 1) > 1:
                raise LayoutError("--expert_model_parallel_size / --expert_tensor_parallel_size need an MoE "
                                  "model; this model's config.json declares no experts")
            return
        if num_experts % ep:
            divisors = [str(d) for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise LayoutError(f"--expert_model_parallel_size {ep} does not divide the model's {num_experts} "
                              f"experts; use one of {', '.join(divisors)}")
        if topk is not None and not 1 <= topk <= num_experts:
            raise LayoutError(f"--moe_router_topk {topk} must be between 1 and the model's {num_experts} experts")
        etp = etp or self.tensor_model_parallel_size
        if moe_ffn_hidden_size and moe_ffn_hidden_size % etp:
            raise LayoutError(f"--expert_tensor_parallel_size {etp} does not divide the experts' FFN size "
                              f"{moe_ffn_hidden_size} (--expert_tensor_parallel_size defaults to "
                              "--tensor_model_parallel_size); use a divisor or --expert_tensor_parallel_size 1")
        if training and self.tensor_model_parallel_size > 1 and not self.sequence_parallel:
            raise LayoutError(f"an MoE model at --tensor_model_parallel_size {self.tensor_model_parallel_size} "
                              "needs --sequence_parallel true (megatron-core builds MoE layers under TP only "
                              "with sequence parallel)")

    def validate_sequence_budget(self, max_length: Optional[int]) -> None:
        """Context parallel cuts every sequence into 2 x CP chunks (and sequence parallel each
        rank's share into TP pieces): the sequence budget must split that way."""
        cp, tp = self.context_parallel_size, self.tensor_model_parallel_size
        if cp == 1 or max_length is None:
            return
        need = self.sequence_multiple
        if max_length % need:
            why = f"2 x --context_parallel_size {cp}" + (
                f" and --tensor_model_parallel_size {tp} x --context_parallel_size {cp} (sequence parallel)"
                if self.sequence_parallel else "")
            raise LayoutError(
                f"--max_length/--packing_length {max_length} is not divisible by {need} ({why}): "
                f"use a multiple of {need}, e.g. {max_length - max_length % need or need}")

    @staticmethod
    def _validate_uneven(num_layers: int, pp: int, vpp: int, first, last) -> None:
        flags = "--decoder_first_pipeline_num_layers / --decoder_last_pipeline_num_layers"
        if pp < 2:
            raise LayoutError(f"{flags} need --pipeline_model_parallel_size >= 2")
        if vpp > 1:
            raise LayoutError(f"{flags} cannot be combined with virtual pipeline stages")
        middle_stages = pp - (first is not None) - (last is not None)
        middle_layers = num_layers - (first or 0) - (last or 0)
        if any(n is not None and n < 1 for n in (first, last)) or middle_layers < 0:
            raise LayoutError(f"{flags} ({first}, {last}) do not fit the model's {num_layers} layers")
        if middle_stages == 0 and middle_layers:
            raise LayoutError(f"{flags} ({first}, {last}) leave {middle_layers} layers for no stage")
        if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
            raise LayoutError(
                f"{flags} ({first}, {last}) leave {middle_layers} layers, which do not split evenly "
                f"over the {middle_stages} other stage(s)")
