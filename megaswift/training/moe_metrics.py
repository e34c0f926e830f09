"""What an MoE run logs each iteration: the router losses megatron-core tracks and the expert load.

- `load_balancing_loss` (also `seq_`/`global_` variants) and `z_loss`: megatron's routers record
  them per layer when their coefficients are set; averaged over MoE layers and micro-batches.
- Expert load: a forward hook on each router counts the tokens routed to each expert (its
  `routing_map`), summed over every rank that routes tokens of that layer. Logged per layer as
  `moe_layer{L}_tokens_min` / `_max` / `_cv` (coefficient of variation of tokens per expert), and
  over the model as `moe_load_cv` (mean over layers) and `moe_load_max_over_mean` (the worst
  layer's most loaded expert against the mean). Counts cover training micro-batches only; with
  `--recompute_modules moe` each routing is seen twice, which scales the counts, not the ratios.

Collective: every rank calls `collect()` at each log step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
               "global_aux_loss": "global_load_balancing_loss"}


class MoEMetrics:
    def __init__(self, chunks: list, config):
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers = config.num_layers
        self.num_experts = config.num_moe_experts or 0
        from megaswift.runtime.distributed import device

        # kept on the compute device: a per-layer copy to the host would synchronise every forward
        self.counts = torch.zeros(self.num_layers, max(self.num_experts, 1), dtype=torch.float64, device=device())
        self.hooks = []
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    self.hooks.append(module.register_forward_hook(self._count))
        types = config.moe_router_load_balancing_type
        types = types if isinstance(types, list) else [types]
        coeffs = config.moe_aux_loss_coeff if isinstance(config.moe_aux_loss_coeff, list) else [config.moe_aux_loss_coeff]
        self.loss_names = [_LOSS_NAMES[t] for t, c in zip(types, coeffs) if t in _LOSS_NAMES and c]
        if config.moe_z_loss_coeff:
            self.loss_names.append("z_loss")
        self.moe_layers = None  # global layer indices with a router, known after the first reduce

    @property
    def active(self) -> bool:
        return self.num_experts > 0

    def _count(self, module, inputs, output) -> None:
        if not module.training:
            return
        routing_map = output[1].detach()
        padding = inputs[1] if len(inputs) > 1 else None  # router(hidden_states, padding_mask)
        if padding is not None:
            routing_map = routing_map & ~padding.reshape(-1, 1)
        self.counts[module.layer_number - 1] += routing_map.sum(dim=0).to(torch.float64)

    def collect(self, num_microbatches: int) -> dict[str, float]:
        """The figures since the last call (and reset them). Collective over all ranks."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker


        tracker = get_moe_layer_wise_logging_tracker()
        # Every rank of a pipeline stage (TP x CP x DP) records each layer's loss; ranks of an entry's
        # `reduce_group` (TP x CP under sequence parallel) hold partial sums of one value, the rest
        # copies: scaled here so that one sum over all ranks gives the mean over data-parallel replicas.
        copies = dist.get_world_size() // parallel_state.get_pipeline_model_parallel_world_size()
        rows = []
        for name in self.loss_names:
            entry = tracker.get(name)
            if entry is None:
                rows.append(torch.zeros(self.num_layers, dtype=torch.float64))
                continue
            partial = entry.get("reduce_group")
            share = copies / (partial.size() if partial is not None else 1)
            rows.append(entry["values"].detach().to("cpu", torch.float64) / share)
        losses = torch.stack(rows) if rows else torch.zeros(0, self.num_layers, dtype=torch.float64)
        packed = torch.cat([self.counts.flatten(), losses.flatten().to(self.counts.device)])
        dist.all_reduce(packed)
        packed = packed.cpu()
        counts = packed[: self.counts.numel()].view(self.counts.shape)
        losses = packed[self.counts.numel():].view(len(self.loss_names), self.num_layers)
        self.counts.zero_()
        clear_aux_losses_tracker()

        layers = [i for i in range(self.num_layers) if counts[i].sum() > 0]
        out: dict[str, float] = {}
        for name, per_layer in zip(self.loss_names, losses):
            out[name] = float(per_layer[layers].mean() / num_microbatches) if layers else 0.0
        cvs, peaks = [], []
        for i in layers:
            c = counts[i]
            mean = c.mean()
            cv = float(c.std(unbiased=False) / mean)
            cvs.append(cv)
            peaks.append(float(c.max() / mean))
            out.update({f"moe_layer{i + 1}_tokens_min": float(c.min()), f"moe_layer{i + 1}_tokens_max": float(c.max()),
                        f"moe_layer{i + 1}_cv": round(cv, 6)})
        if layers:
            out["moe_load_cv"] = sum(cvs) / len(cvs)
            out["moe_load_max_over_mean"] = max(peaks)
        return out
