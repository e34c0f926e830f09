"""Tuner arguments: `--train_type full|lora`, LoRA's and the freezing flags (Megatron-SWIFT's names and defaults)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional


@dataclass(kw_only=True)
class TunerArgs:
    """Full-parameter or LoRA training, and which parameters train."""
    train_type: str = field(default="full", metadata={"help": "full|lora", "choices": ("full", "lora")})
    # LoRA
    adapter_load: Optional[str] = field(default=None, metadata={"help": "A LoRA run to resume (or, with --finetune true, to continue from iteration 0)."})
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Module name suffixes that get LoRA (all-linear: every linear of the decoder; all-router: MoE routers)."})
    target_regex: Optional[str] = field(default=None, metadata={"help": "Regex on module names (global layer numbers) that get LoRA; overrides --target_modules."})
    modules_to_save: list[str] = field(default_factory=list, metadata={"help": "Modules trained in full and saved with the adapter (e.g. word_embeddings output_layer)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input."})
    lora_bias: str = field(default="none", metadata={"help": "none|all (all: every bias trains and is saved with the adapter)", "choices": ("none", "all")})
    use_rslora: bool = field(default=False, metadata={"help": "rsLoRA: scale alpha/sqrt(r)."})
    # full-parameter freezing
    freeze_parameters: list[str] = field(default_factory=list, metadata={"help": "Prefixes of parameter names to freeze (full training)."})
    freeze_parameters_regex: Optional[str] = field(default=None, metadata={"help": "Regex of parameter names to freeze (full training)."})
    freeze_parameters_ratio: float = field(default=0.0, metadata={"help": "Fraction of parameters frozen from the bottom (embedding first); 1 freezes all."})
    trainable_parameters: list[str] = field(default_factory=list, metadata={"help": "Prefixes of parameter names that train even if frozen above."})
    trainable_parameters_regex: Optional[str] = field(default=None, metadata={"help": "Regex of parameter names that train even if frozen above."})

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"--lora_rank {self.lora_rank} must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        if not 0.0 <= self.freeze_parameters_ratio <= 1.0:
            raise ValueError(f"--freeze_parameters_ratio {self.freeze_parameters_ratio} must be in [0, 1]")
        for flag in ("target_regex", "freeze_parameters_regex", "trainable_parameters_regex"):
            value = getattr(self, flag)
            if value is not None:
                try:
                    re.compile(value)
                except re.error as e:
                    raise ValueError(f"--{flag} {value!r} is not a valid regular expression: {e}") from None
        if self.train_type == "full" and self.adapter_load:
            raise ValueError("--adapter_load needs --train_type lora (it holds a LoRA run's adapters)")

    @property
    def lora(self) -> bool:
        return self.train_type == "lora"

    def lora_config(self) -> dict:
        """What rebuilds the adapters (kept in a LoRA run's args.json)."""
        return {"target_modules": list(self.target_modules), "target_regex": self.target_regex,
                "modules_to_save": list(self.modules_to_save), "lora_rank": self.lora_rank,
                "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout, "lora_bias": self.lora_bias,
                "use_rslora": self.use_rslora}
