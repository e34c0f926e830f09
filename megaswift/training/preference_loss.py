"""The DPO loss family, equal to TRL's ``DPOTrainer`` definitions (pure torch, no megatron).

The specification is TRL 0.27.2's ``trl/trainer/dpo_trainer.py`` (``dpo_loss``,
``concatenated_forward``, ``get_batch_loss_metrics``) and ``dpo_config.py``: the last TRL release
with the DPO trainer Megatron-SWIFT's ``--loss_type``/``--rpo_alpha``/``--reference_free``/
``--f_alpha_divergence_coef`` options map onto (TRL >= 0.28 renamed ``aot_pair``, and TRL >= 0.29
rewrote the trainer without ``rpo_alpha``, ``reference_free`` or ``bco_pair``'s running mean).

Loss types (``--loss_type``; several may be combined with ``loss_weights``, as TRL's MPO does)::

    sigmoid    -log σ(β·Δ), with cDPO label smoothing ε: -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ)   (DPO)
    hinge      relu(1 - β·Δ)                                                                 (SLiC)
    ipo        (Δ - 1/(2β))², on per-token *mean* log-probs                                   (IPO)
    exo_pair   KL(softmax over {chosen, rejected} of β·Δ ‖ [1-ε, ε]), ε defaults to 1e-3     (EXO)
    nca_pair   -log σ(r_c) - ½·log σ(-r_c) - ½·log σ(-r_r)                                    (NCA)
    robust     (-(1-ε)·log σ(β·Δ) + ε·log σ(-β·Δ)) / (1-2ε), unbiased under label noise ε     (rDPO)
    bco_pair   -log σ(r_c - δ) - log σ(-(r_r - δ)), δ a running mean of the rewards           (BCO)
    sppo_hard  (ρ_c - 1/(2β))² + (ρ_r + 1/(2β))², hard-label SPPO                            (SPPO)
    aot        sigmoid loss on sorted(π log-ratios) - sorted(ref log-ratios) over the batch   (AOT)
    aot_pair   sigmoid loss on sorted(ρ_c) - sorted(ρ_r) over the batch (TRL >= 0.28: aot_unpaired)
    apo_zero   (1 - σ(r_c)) + σ(r_r): raise chosen, lower rejected likelihood                 (APO)
    apo_down   σ(r_c) + (1 - σ(r_c - r_r)): lower both, rejected more                          (APO)
    discopop   log-ratio-modulated mix of the logistic and exp losses, temperature τ      (DiscoPOP)
    sft        the NLL of the chosen completions (mean over their tokens), for MPO mixes

where ρ = log π(y|x) - log π_ref(y|x) (per sequence), r = β·ρ, and Δ = ρ_c - ρ_r under the default
``reverse_kl`` f-divergence (f-DPO's generalisations replace Δ: see :func:`dpo_loss`).

What a caller (the training loop) must honour to reproduce TRL:

* per-sequence log-probs are the **sum** of the completion tokens' log-probs, except when any
  selected loss type is ``ipo``: then the **mean** over the completion tokens, for the policy and
  the reference alike, for every loss type of the mix and for the logged ``logps/*`` (use
  :func:`sequence_logps`);
* ``rpo_alpha`` (and the ``sft`` type) add ``nll_loss`` to every pair's loss: the cross entropy of
  the chosen completions' tokens, averaged over tokens (not per sequence). TRL averages it over
  the tokens of one micro-batch; a distributed caller passes its chosen-token NLL sum and count to
  :func:`metric_sums` and may pass the global token mean to :func:`dpo_loss`;
* ``aot``/``aot_pair`` sort across the batch they are given (TRL: one device's micro-batch), so
  their per-pair losses depend on the micro-batch, not on one pair;
* ``bco_pair`` keeps a running mean of the rewards across iterations: :class:`BCOPairState`, held
  by the caller, updated once per :func:`dpo_loss` call (with ``all_reduce`` over data-parallel
  ranks, as TRL's ``RunningMoments`` does) and saved/restored with the checkpoint;
* the logged rewards are ``β·ρ`` against the real reference even when ``reference_free`` (TRL still
  runs the reference model), and with several loss types they are summed with ``loss_weights``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
              "aot", "aot_pair", "apo_zero", "apo_down", "discopop", "sft")
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# loss types whose formula goes through Δ (the reward difference) and so through the f-divergence
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "sft")
# loss types that read label_smoothing (TRL ignores it, with a warning, for the others)
LABEL_SMOOTHING_LOSS_TYPES = ("sigmoid", "robust", "exo_pair", "aot", "aot_pair")
METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss")


@dataclass
class PreferenceLossConfig:
    """The options of the DPO loss, with Megatron-SWIFT's / TRL's names and defaults.

    ``loss_type``: one name of :data:`LOSS_TYPES`, a comma-separated string or a list of them;
    ``loss_weights``: one weight per loss type (default 1.0 each).
    ``label_smoothing`` (ε, in [0, 0.5)): cDPO/robust/AOT smoothing and EXO's ε.
    ``rpo_alpha``: weight of the chosen-token NLL added to the loss (None: no NLL term).
    ``reference_free``: Δ and the log-ratios of sigmoid/hinge/ipo/exo_pair/robust/apo_* ignore the
    reference (TRL's semantics: the other types and the logged rewards still use it).
    ``f_divergence_type``: reverse_kl (DPO), forward_kl, js_divergence or alpha_divergence (f-DPO);
    ``f_alpha_divergence_coef``: α of the α-divergence (TRL <= 0.27's u^-α form, default 1.0).
    ``discopop_tau``: DiscoPOP's temperature.
    """

    beta: float = 0.1
    loss_type: Union[str, Sequence[str]] = "sigmoid"
    loss_weights: Optional[Sequence[float]] = None
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    # normalised in __post_init__
    loss_types: tuple = field(init=False, repr=False)
    weights: tuple = field(init=False, repr=False)

    def __post_init__(self):
        lt = self.loss_type
        names = [s.strip() for s in lt.split(",")] if isinstance(lt, str) else [str(s).strip() for s in lt]
        if not names or any(not n for n in names):
            raise ValueError(f"loss_type is empty; valid loss types: {', '.join(LOSS_TYPES)}")
        unknown = [n for n in names if n not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_type {', '.join(map(repr, unknown))}; valid loss types: "
                             f"{', '.join(LOSS_TYPES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"loss_type lists a type twice: {names}")
        self.loss_types = tuple(names)
        if self.loss_weights is None:
            self.weights = (1.0,) * len(names)
        else:
            self.weights = tuple(float(w) for w in self.loss_weights)
            if len(self.weights) != len(names):
                raise ValueError(f"loss_weights has {len(self.weights)} weights for {len(names)} loss types "
                                 f"{list(names)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {self.beta}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; valid: "
                             f"{', '.join(F_DIVERGENCE_TYPES)}")
        if self.f_divergence_type != "reverse_kl":
            bad = [n for n in names if n not in F_DIVERGENCE_LOSS_TYPES]
            if bad:
                raise ValueError(f"f_divergence_type={self.f_divergence_type!r} only applies to the loss types "
                                 f"{', '.join(F_DIVERGENCE_LOSS_TYPES)}; {', '.join(bad)} would ignore it "
                                 "(use reverse_kl)")
            if self.f_divergence_type == "alpha_divergence" and not (
                    math.isfinite(self.f_alpha_divergence_coef) and self.f_alpha_divergence_coef != 0):
                raise ValueError(f"f_alpha_divergence_coef must be a non-zero number, got "
                                 f"{self.f_alpha_divergence_coef}")
        if not (0.0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing > 0 and not any(n in LABEL_SMOOTHING_LOSS_TYPES for n in names):
            raise ValueError(f"label_smoothing={self.label_smoothing} is ignored by loss type(s) {', '.join(names)}; "
                             f"it applies to {', '.join(LABEL_SMOOTHING_LOSS_TYPES)} only")
        if self.rpo_alpha is not None and not (math.isfinite(self.rpo_alpha) and self.rpo_alpha >= 0):
            raise ValueError(f"rpo_alpha must be None or a non-negative number, got {self.rpo_alpha}")
        if not (math.isfinite(self.discopop_tau) and self.discopop_tau > 0):
            raise ValueError(f"discopop_tau must be a positive number, got {self.discopop_tau}")

    @property
    def mean_logps(self) -> bool:
        """Whether the per-sequence log-probs are token means (TRL: when ``ipo`` is selected) not sums."""
        return "ipo" in self.loss_types

    @property
    def needs_nll(self) -> bool:
        """Whether the loss has the chosen-token NLL term (``rpo_alpha`` set or an ``sft`` type)."""
        return self.rpo_alpha is not None or "sft" in self.loss_types

    @property
    def exo_epsilon(self) -> float:
        """EXO's ε: label_smoothing, or 1e-3 when that is 0 (TRL's default)."""
        return self.label_smoothing if self.label_smoothing > 0 else 1e-3


@dataclass
class BCOPairState:
    """``bco_pair``'s running reward mean δ: TRL's ``RunningMoments`` (same fields, same updates).

    The caller keeps one across iterations and checkpoints it (``state_dict``/``load_state_dict``,
    or ``to_json``/``from_json``, which read and write TRL's ``RunningMoments.save_to_json`` format).
    """

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """Fold the values ``xs`` (TRL: one scalar per rank) into the running moments.

        ``all_reduce`` sums a tensor across the data-parallel ranks (returning the summed tensor), as
        TRL's ``get_global_statistics`` does under accelerate; None: this process only.
        """
        if all_reduce is not None:
            sum_and_count = torch.stack([xs.sum().to(torch.float32),
                                         torch.tensor(float(xs.numel()), device=xs.device)])
            sum_and_count = all_reduce(sum_and_count)
            global_sum, count = sum_and_count
            xs_mean = global_sum / count
            sum_var = all_reduce(torch.sum((xs - xs_mean) ** 2).reshape(1)).reshape(())
            xs_var = sum_var / count
            xs_count = count.item()
        else:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = tot_count

    def state_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for k in ("mean", "std", "var", "count"):
            setattr(self, k, float(state[k]))

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "BCOPairState":
        return cls(**{k: float(v) for k, v in json.loads(text).items()})


def _cap_exp(value: torch.Tensor) -> torch.Tensor:
    """TRL's ``cap_exp``: exp with the exponent capped at log(dtype max), floored to 4 decimals."""
    vmax = torch.zeros([1]).to(value.dtype) + torch.finfo(value.dtype).max
    cap = torch.floor(torch.log(vmax).to(value.device) * 10 ** 4) / 10 ** 4
    return torch.exp(torch.clamp(value, max=cap))


def sequence_logps(cfg: PreferenceLossConfig, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-probs from per-token ones ``[n, T]`` and the completion-token ``mask``:
    the sum over the completion tokens, or their mean when ``cfg.mean_logps`` (ipo)."""
    mask = mask.to(token_logps.dtype)
    logps = (token_logps * mask).sum(-1)
    if cfg.mean_logps:
        logps = logps / mask.sum(-1)
    return logps


def dpo_loss(cfg: PreferenceLossConfig, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: Optional[torch.Tensor], ref_rejected_logps: Optional[torch.Tensor],
             state: Optional[BCOPairState] = None, nll_loss: Optional[torch.Tensor] = None,
             all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Per-pair losses and rewards, as TRL's ``DPOTrainer`` computes them before ``.mean()``.

    Inputs are per-pair sequence log-probs ``[n_pairs]`` (see :func:`sequence_logps`). The reference
    ones may be None only with ``reference_free`` (then zeros, so the rewards are β·policy log-probs:
    TRL would report them against the reference model). ``state``: the :class:`BCOPairState`
    (required for ``bco_pair``; updated once per call; ``all_reduce`` reduces its statistics over
    the data-parallel ranks). ``nll_loss``: the chosen-token NLL (a scalar, mean over tokens),
    required when ``cfg.needs_nll``; it is added as ``rpo_alpha * nll_loss`` (and ``w * nll_loss``
    for an ``sft`` type) to every pair's loss.

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``[n_pairs]``: the loss types'
    losses and rewards (``β·ρ``) summed with ``loss_weights``, plus the NLL terms.
    """
    if ref_chosen_logps is None or ref_rejected_logps is None:
        if not cfg.reference_free:
            raise ValueError("reference log-probs are required unless reference_free")
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    if cfg.needs_nll and nll_loss is None:
        raise ValueError("rpo_alpha / the sft loss type need nll_loss (chosen-token NLL, mean over tokens)")
    if "bco_pair" in cfg.loss_types and state is None:
        raise ValueError("the bco_pair loss type needs a BCOPairState (kept across iterations)")

    beta, ls = cfg.beta, cfg.label_smoothing
    pc, pr, rc, rr = policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    # log-ratios: the reference-free ones (Δ, apo_*) and the true ones (everything else)
    keep_ref = 0.0 if cfg.reference_free else 1.0
    chosen_lr = pc - keep_ref * rc
    rejected_lr = pr - keep_ref * rr
    true_chosen_lr = pc - rc
    true_rejected_lr = pr - rr

    fdiv = cfg.f_divergence_type
    if fdiv in ("forward_kl", "alpha_divergence"):
        # f'(u) = (1 - u^-α)/α; forward KL is α = 1 (TRL <= 0.27's alpha_divergence at its default)
        a = 1.0 if fdiv == "forward_kl" else cfg.f_alpha_divergence_coef
        logits = (_cap_exp(rejected_lr * -a) - _cap_exp(chosen_lr * -a)) / a
    else:
        logits = (pc - pr) - keep_ref * (rc - rr)
        if fdiv == "js_divergence":
            logits = logits - (F.softplus(chosen_lr) - F.softplus(rejected_lr))

    base_chosen_rewards = beta * true_chosen_lr.detach()
    base_rejected_rewards = beta * true_rejected_lr.detach()
    losses = chosen_rewards = rejected_rewards = 0.0
    for loss_type, w in zip(cfg.loss_types, cfg.weights):
        if loss_type == "sigmoid":
            lo = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        elif loss_type == "robust":
            lo = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
        elif loss_type == "exo_pair":
            eps = cfg.exo_epsilon
            lo = (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - eps)) + \
                (-beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(eps))
        elif loss_type == "hinge":
            lo = torch.relu(1 - beta * logits)
        elif loss_type == "ipo":
            lo = (logits - 1 / (2 * beta)) ** 2
        elif loss_type == "bco_pair":
            cr, rj = beta * true_chosen_lr, beta * true_rejected_lr
            state.update(torch.cat((cr, rj), 0).mean().detach(), all_reduce)
            delta = state.mean
            lo = -F.logsigmoid(cr - delta) - F.logsigmoid(-(rj - delta))
        elif loss_type == "sppo_hard":
            lo = (true_chosen_lr - 0.5 / beta) ** 2 + (true_rejected_lr + 0.5 / beta) ** 2
        elif loss_type == "nca_pair":
            cr, rj = true_chosen_lr * beta, true_rejected_lr * beta
            lo = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rj)
        elif loss_type == "aot_pair":
            delta = torch.sort(true_chosen_lr, dim=0)[0] - torch.sort(true_rejected_lr, dim=0)[0]
            lo = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif loss_type == "aot":
            delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
            lo = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif loss_type == "apo_zero":
            lo = (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
        elif loss_type == "apo_down":
            lo = torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(beta * (chosen_lr - rejected_lr)))
        elif loss_type == "discopop":
            lg = ((pc - pr) - (rc - rr)) * beta
            modulation = torch.sigmoid(lg / cfg.discopop_tau)
            lo = -F.logsigmoid(lg) * (1 - modulation) + torch.exp(-lg) * modulation
        elif loss_type == "sft":
            lo = nll_loss.expand(pc.shape[0])
        else:  # unreachable: validated in the config
            raise ValueError(f"unknown loss_type {loss_type!r}; valid loss types: {', '.join(LOSS_TYPES)}")
        losses = losses + lo * w
        chosen_rewards = chosen_rewards + base_chosen_rewards * w
        rejected_rewards = rejected_rewards + base_rejected_rewards * w
    if cfg.rpo_alpha is not None:
        losses = losses + cfg.rpo_alpha * nll_loss
    return losses, chosen_rewards, rejected_rewards


def metric_sums(cfg: PreferenceLossConfig, losses: torch.Tensor, chosen_rewards: torch.Tensor,
                rejected_rewards: torch.Tensor, policy_chosen_logps: torch.Tensor,
                policy_rejected_logps: torch.Tensor, nll_sum: Optional[torch.Tensor] = None,
                nll_count: Optional[torch.Tensor] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The logged figures of a (micro-)batch as ``name -> (sum, count)`` tensors.

    Sum them over micro-batches and data-parallel ranks, then a figure is ``sum / count``
    (:func:`metrics_from_sums`): the means TRL logs over the global batch. ``nll_loss`` (present
    when ``cfg.needs_nll``) is token-weighted: ``nll_sum`` is the chosen completion tokens' summed
    NLL, ``nll_count`` their number.
    """
    n = torch.tensor(float(losses.numel()), device=losses.device)
    d = lambda t: t.detach().float().sum()  # noqa: E731
    out = {
        "loss": (d(losses), n),
        "rewards/chosen": (d(chosen_rewards), n),
        "rewards/rejected": (d(rejected_rewards), n),
        "rewards/accuracies": (d((chosen_rewards > rejected_rewards).float()), n),
        "rewards/margins": (d(chosen_rewards - rejected_rewards), n),
        "logps/chosen": (d(policy_chosen_logps), n),
        "logps/rejected": (d(policy_rejected_logps), n),
    }
    if cfg.needs_nll:
        if nll_sum is None or nll_count is None:
            raise ValueError("rpo_alpha / the sft loss type need nll_sum and nll_count")
        out["nll_loss"] = (nll_sum.detach().float().reshape(()),
                           torch.as_tensor(nll_count, device=losses.device).float().reshape(()))
    return out


def metrics_from_sums(sums: dict[str, tuple]) -> dict[str, float]:
    """``name -> sum / count`` (0.0 where count is 0)."""
    out = {}
    for name, (s, c) in sums.items():
        c = float(c)
        out[name] = float(s) / c if c > 0 else 0.0
    return out
