"""`--test_convert_precision`: MCore logits against transformers', padded and packed, in float32.

The check fails (exit status 1) when max |logit difference| exceeds `MAX_ABS_DIFF` or any argmax
differs. The threshold is for float32 on both sides: the two implementations only differ in the
order of floating point operations (fused QKV/GLU matmuls, attention kernel), which for models up to
a few billion parameters moves logits by ~1e-5..1e-4; a wrong mapping moves them by O(1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megaswift.context_parallel import pad_multiple
from megaswift.data.collate import collate_padded, collate_padding_free
from megaswift.model.forward import forward_logits

MAX_ABS_DIFF = 1e-3

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a haiku about tensor parallelism."}],
]


@dataclass(frozen=True)
class PrecisionReport:
    layout: str
    mean_abs_diff: float
    max_abs_diff: float
    argmax_agreement: float
    tokens: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= MAX_ABS_DIFF and self.argmax_agreement == 1.0

    def line(self) -> str:
        return (f"[precision] {self.layout:6s} tokens={self.tokens} mean_abs_diff={self.mean_abs_diff:.3e} "
                f"max_abs_diff={self.max_abs_diff:.3e} argmax_agreement={self.argmax_agreement:.4f} "
                f"(threshold {MAX_ABS_DIFF:g}) {'OK' if self.ok else 'FAIL'}")


def sample_token_ids(tokenizer, vocab_size: int) -> list[list[int]]:
    """Chat-formatted token ids (the tokenizer's template), or fixed ids without a tokenizer."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        out = []
        for conv in CONVERSATIONS:
            ids = tokenizer.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
        return out
    if tokenizer is not None:
        return [tokenizer(c[-1]["content"])["input_ids"] for c in CONVERSATIONS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (23, 11)]


def _hf_logits(hf_model, samples) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf_model(torch.tensor([s])).logits[0].float() for s in samples]


def compare(model, config, hf_model, samples: list[list[int]], vocab_size: int) -> list[PrecisionReport]:
    """Reports for the padded and the packed batch; every model-parallel rank must call it.

    `hf_model` is needed only where the logits land (last pipeline stage); pass None elsewhere.
    """
    reports = []
    rows = [{"input_ids": s, "labels": s} for s in samples]  # the training batchers, labels unused
    lengths = [len(s) for s in samples]
    multiple = pad_multiple(config.tensor_model_parallel_size, config.sequence_parallel, 1)
    batches = (("padded", collate_padded(rows, pad_id=0, multiple=multiple)),
               ("packed", collate_padding_free(rows, pad_id=0, multiple=multiple)))
    for layout, batch in batches:
        logits = forward_logits(model, batch, config)
        if logits is None:
            reports.append(None)
            continue
        logits = logits.float()[..., :vocab_size]
        if layout == "padded":
            mine = [logits[i, :n] for i, n in enumerate(lengths)]
        else:
            mine = list(logits[0].split(lengths))
        ref = _hf_logits(hf_model, samples)
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(mine, ref)])
        agree = torch.cat([a.argmax(-1) == b.argmax(-1) for a, b in zip(mine, ref)]).float().mean()
        reports.append(PrecisionReport(layout, diff.mean().item(), diff.max().item(),
                                       agree.item(), sum(len(s) for s in samples)))
    return _share_from_last_stage(reports)


def _share_from_last_stage(reports):
    """Every rank gets the last stage's reports, so all ranks exit with the same status."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return reports
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, reports if parallel_state.is_pipeline_last_stage() else None)
    return next(r for r in gathered if r is not None)
