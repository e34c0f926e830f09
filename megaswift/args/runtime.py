"""Implementation choices (Megatron-LM / Megatron-SWIFT names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megaswift.runtime.context import ATTENTION_BACKENDS, TRANSFORMER_IMPLS


@dataclass(kw_only=True)
class RuntimeArgs:
    """Transformer implementation and attention kernel (speed only: fall back where missing)."""
    transformer_impl: str = field(default="transformer_engine", metadata={
        "help": "local|transformer_engine; without CUDA + TransformerEngine the local spec is used (logged).",
        "choices": TRANSFORMER_IMPLS})
    attention_backend: str = field(default="flash", metadata={
        "help": "flash|fused|unfused|local|auto; without TransformerEngine: torch SDPA for flash/fused/auto, "
                "the plain-torch reference for unfused/local (logged).",
        "choices": ATTENTION_BACKENDS})
