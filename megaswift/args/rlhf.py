"""Preference-training arguments of `megatron rlhf` (Megatron-SWIFT's DPO section: names and defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megaswift.training.preference_loss import F_DIVERGENCE_TYPES, LOSS_TYPES, PreferenceLossConfig


@dataclass(kw_only=True)
class RLHFArgs:
    """DPO: the loss (TRL's definitions), the reference model."""
    rlhf_type: str = field(default="dpo", metadata={"help": "dpo", "choices": ("dpo",)})
    ref_load: Optional[str] = field(default=None, metadata={"help": "The reference model's MCore checkpoint (default: the policy's --load/--model)."})
    ref_adapter_load: Optional[str] = field(default=None, metadata={"help": "A LoRA run whose adapters (on the base) are the reference model."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (deviation from the reference; IPO's regulariser)."})
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"], metadata={"help": f"TRL's loss type(s): {', '.join(LOSS_TYPES)}."})
    loss_weights: Optional[list[float]] = field(default=None, metadata={"help": "One weight per --loss_type (default 1 each)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO / robust / EXO label smoothing in [0, 0.5)."})
    rpo_alpha: Optional[float] = field(default=None, metadata={"help": "Weight of the chosen answers' NLL added to the loss (RPO); None: no NLL term."})
    reference_free: bool = field(default=False, metadata={"help": "Ignore the reference model (a uniform reference), as TRL."})
    f_divergence_type: str = field(default="reverse_kl", metadata={"help": "f-DPO divergence.", "choices": F_DIVERGENCE_TYPES})
    f_alpha_divergence_coef: float = field(default=1.0, metadata={"help": "alpha of --f_divergence_type alpha_divergence."})
    discopop_tau: float = field(default=0.05, metadata={"help": "DiscoPOP temperature."})

    def __post_init__(self) -> None:
        self.loss_config()  # every bad value is refused here, naming the option

    def loss_config(self) -> PreferenceLossConfig:
        return PreferenceLossConfig(  # its errors name the option (--loss_type, --beta ...)
            beta=self.beta, loss_type=list(self.loss_type), loss_weights=self.loss_weights,
            label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha, reference_free=self.reference_free,
            f_divergence_type=self.f_divergence_type, f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.discopop_tau)
