"""Fixes for wrong behaviour of megatron-core versions, on every device; registered in the same
registry as the CPU adaptations (`cpu_compat.adaptation`), each under the call site it serves.

All three concern resuming training from a torch_dist checkpoint with megatron-core's
optimizers built on torch's Adam / SGD (no TransformerEngine or apex: `HAVE_APEX_OR_TE` False;
TE's and apex's FusedAdam / FusedSGD are left alone). Measured with megatron-core 0.16.1 by
`tests/test_cpu_compat.py`, which saves a tiny model's optimizer after 3 steps and loads it into
a fresh one through megatron's sharded optimizer state dict. The checkpoint loader calls them:
`before_optimizer_load(optimizer)` before the sharded state dict to load into is built,
`after_optimizer_load(optimizer, loaded)` after `optimizer.load_state_dict(loaded)`.
"""

from __future__ import annotations

import torch

from megaswift.runtime.cpu_compat import AFTER_OPTIMIZER_LOAD, BEFORE_OPTIMIZER_LOAD, adaptation, run


def _sub_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer` (a ChainedOptimizer holds several)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _fill_empty_states(inner: torch.optim.Optimizer, fresh) -> None:
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state[p]
            if not st:
                st.update(fresh(p))


@adaptation("optimizer/distrib_optimizer.py DistributedOptimizer.state_dict, called by "
            "sharded_state_dict(is_loading=True): asserts one 'step' over the torch Adam state, "
            "which is empty before the first step (AssertionError; megatron-core 0.16.1)",
            when=BEFORE_OPTIMIZER_LOAD)
def adam_state_placeholders(optimizer) -> None:
    """Give every parameter an empty Adam state (step 0) before a load; the loaded values
    overwrite it in place (`restore_adam_steps` puts the step back)."""
    for opt in _sub_optimizers(optimizer):
        if isinstance(opt.optimizer, torch.optim.Adam | torch.optim.AdamW):
            _fill_empty_states(opt.optimizer, lambda p: {
                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": torch.tensor(0.0)})


@adaptation("optimizer/__init__.py builds torch SGD with init_state_fn=None, which optimizer/optimizer.py "
            "FP32Optimizer.sharded_state_dict(is_loading=True) calls (TypeError: 'NoneType' object is "
            "not callable; megatron-core 0.16.1)", when=BEFORE_OPTIMIZER_LOAD)
def sgd_state_placeholders(optimizer) -> None:
    """Stand in for SGD's missing state initialiser: a no-op initialiser, and a momentum buffer
    per parameter for the loaded momentum to land in."""
    for opt in _sub_optimizers(optimizer):
        inner = opt.optimizer
        if isinstance(inner, torch.optim.SGD):
            if getattr(opt, "init_state_fn", True) is None:
                opt.init_state_fn = lambda *_args, **_kw: None
            if inner.defaults.get("momentum"):
                _fill_empty_states(inner, lambda p: {"momentum_buffer": torch.zeros_like(p)})


def _param_group_steps(tree) -> set[float]:
    """Every `param_groups[*].step` in a loaded optimizer state (one per sub-optimizer)."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "param_groups" and isinstance(v, list):
                found |= {float(g["step"]) for g in v if isinstance(g, dict) and g.get("step") is not None}
            elif k != "param_state":
                found |= _param_group_steps(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            found |= _param_group_steps(v)
    return found


@adaptation("optimizer/distrib_optimizer.py DistributedOptimizer.load_state_dict with the "
            "'dp_reshardable' param state: sets one shared 'step' tensor from the saved param "
            "groups, then the per-parameter state (which does not store the step) brings back the "
            "placeholder: every Adam state's step is one shared tensor holding 0 instead of the "
            "saved count (megatron-core 0.16.1), so bias correction restarts and a resumed run "
            "diverges", when=AFTER_OPTIMIZER_LOAD)
def restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Give every Adam state its own `step` tensor holding the saved step count."""
    steps = _param_group_steps(loaded_optimizer_state)
    if not steps:
        return
    if len(steps) != 1:
        raise RuntimeError(f"checkpoint optimizer has inconsistent step counts {sorted(steps)}")
    step = steps.pop()
    for opt in _sub_optimizers(optimizer):
        for st in opt.optimizer.state.values():
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32)


def before_optimizer_load(optimizer) -> None:
    run(BEFORE_OPTIMIZER_LOAD, optimizer)


def after_optimizer_load(optimizer, loaded_optimizer_state) -> None:
    run(AFTER_OPTIMIZER_LOAD, optimizer, loaded_optimizer_state)


STARTUP = "startup"  # run once by `init_distributed` on every device; each fix checks its own condition
_started = False


@adaptation("transformer/moe/moe_utils.py RouterGatingLinearFunction: `te_general_gemm is not None` "
            "where the name was never bound (NameError without TransformerEngine; megatron-core 0.16.1)",
            when=STARTUP)
def router_gemm_without_te() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


@adaptation("transformer/moe/router.py TopKRouter.apply_z_loss: with calculate_per_token_loss the z-loss "
            "is scaled by the rank's own token count and its coefficient is also divided by the TP x CP "
            "size, so under sequence or context parallel its gradient is 1/(TP x CP) of one rank's "
            "(measured: grad norm 2.755 at TP=2+SP against 4.974 at TP=1; megatron-core 0.16.1)",
            when=STARTUP)
def z_loss_per_token_scale() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter.apply_z_loss
    if getattr(original, "_megaswift_fixed", False):
        return

    def apply_z_loss(self, logits, padding_mask=None):
        coeff, size = self.config.moe_z_loss_coeff, self.tp_cp_group.size()
        if coeff is None or not self.calculate_per_token_loss or size == 1:
            return original(self, logits, padding_mask=padding_mask)
        self.config.moe_z_loss_coeff = coeff * size  # megatron divides it by the TP x CP size again
        try:
            return original(self, logits, padding_mask=padding_mask)
        finally:
            self.config.moe_z_loss_coeff = coeff

    apply_z_loss._megaswift_fixed = True
    apply_z_loss.__wrapped__ = original
    TopKRouter.apply_z_loss = apply_z_loss


@adaptation("transformer/moe/router.py TopKRouter._apply_expert_bias: `routing_map & ~padding_mask` with a "
            "[tokens] mask against a [tokens, experts] map (RuntimeError: cannot broadcast; any run with "
            "expert bias and a padding mask, megatron-core 0.16.1)", when=STARTUP)
def expert_bias_padding_mask() -> None:
    from megatron.core.transformer.moe.router import TopKRouter

    original = TopKRouter._apply_expert_bias
    if getattr(original, "_megaswift_fixed", False):
        return

    def _apply_expert_bias(self, routing_map, padding_mask=None):
        if padding_mask is not None and padding_mask.dim() == routing_map.dim() - 1:
            padding_mask = padding_mask.unsqueeze(-1)  # one flag per token, for each of its experts
        return original(self, routing_map, padding_mask)

    _apply_expert_bias._megaswift_fixed = True
    _apply_expert_bias.__wrapped__ = original
    TopKRouter._apply_expert_bias = _apply_expert_bias


@adaptation("tensor_parallel/random.py CheckpointWithoutOutput.__init__: `self.fp8 = fp8 is not None` is "
            "True for the default fp8=False, so the forward asks TransformerEngine's FP8GlobalStateManager "
            "(NameError without TE): every output-discarding recompute (--recompute_modules layernorm, "
            "moe_act, mla_up_proj; megatron-core 0.16.1)", when=STARTUP)
def recompute_without_fp8() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    cls = tp_random.CheckpointWithoutOutput
    original = cls.__init__
    if getattr(original, "_megaswift_fixed", False):
        return

    def __init__(self, fp8=False):
        original(self, fp8)
        self.fp8 = fp8 is not None and fp8 is not False

    __init__._megaswift_fixed = True
    __init__.__wrapped__ = original
    cls.__init__ = __init__


def at_startup() -> None:
    global _started
    if not _started:
        run(STARTUP)
        _started = True
