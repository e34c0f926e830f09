"""Per-token losses of the real megatron GPTModel: padding-free THD vs padded, across TP layouts.

Imported by tests/test_padding_free_loss.py for the helpers, and run by it under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_loss_parity.py \
        <hf_dir> <reference.pt>

On 2 gloo ranks with TP=2 + sequence parallel it computes the THD and the padded losses (pad
multiple 2) and compares them with each other and with the TP=1 losses in <reference.pt>
(written by the test with torch.save: {"losses": [tensor per sample]}). Exit status 1 on a
mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaswift.args.parallel import ParallelArgs  # noqa: E402
from megaswift.batch import TrainBatch  # noqa: E402
from megaswift.context_parallel import pad_multiple  # noqa: E402
from megaswift.data.collate import collate_padded, collate_padding_free, split_samples  # noqa: E402

ATOL = 1e-5


def make_samples(vocab: int = 250) -> list[dict]:
    """Fixed samples with prompt tokens masked (-100); the first row is a packed row of two."""
    g = torch.Generator().manual_seed(1234)

    def sample(n: int, prompt: int) -> dict:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}

    a, b = sample(13, 5), sample(6, 2)
    packed = {"input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
              "lengths": [13, 6]}
    return [packed, sample(21, 9), sample(2, 0), sample(9, 3)]


def unpacked(samples: list[dict]) -> list[dict]:
    """The same samples with packed rows split (what the padded collator accepts)."""
    return [{"input_ids": ids, "labels": labels} for ids, labels in split_samples(samples)]


def build_model(src, parallel: ParallelArgs):
    """(GPTModel, TransformerConfig) for the HF folder `src` in float32; distributed must be up."""
    from megaswift.converters.convert import load_hf_weights
    from megaswift.converters.hf_io import HFReader
    from megaswift.model.builder import build_gpt_model
    from megaswift.model.config import transformer_config
    from megaswift.model.hf import HFModel, load_hf_config
    from megatron.core import tensor_parallel

    # TransformerBlock.forward forks the model-parallel RNG under sequence parallel, even with
    # no dropout: without a seeded tracker it raises "rng state model-parallel-rng is not added"
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    hf = HFModel.from_config(load_hf_config(Path(src)), 128, parallel.tensor_model_parallel_size)
    config = transformer_config(hf.config, hf.family, parallel.sizes(), torch.float32,
                                perform_initialization=False)
    model = build_gpt_model(hf.config, config, padded_vocab=hf.dims.padded_vocab_size)
    load_hf_weights([model], hf.family, hf.config, HFReader(Path(src)), hf.dims)
    return model.eval(), config


@torch.no_grad()
def token_losses(model, batch: TrainBatch) -> torch.Tensor:
    """Megatron's per-token losses [b, s] for `batch` (GPTModel called with labels)."""
    return model(batch.input_ids, batch.position_ids, batch.attention_mask, labels=batch.labels,
                 packed_seq_params=batch.packed_seq_params).float()


def per_sample(batch: TrainBatch, losses: torch.Tensor) -> list[torch.Tensor]:
    """The trained positions' losses, one tensor per sample, from a THD or padded batch."""
    out = []
    if batch.packed_seq_params is not None:
        cu = batch.packed_seq_params.cu_seqlens_q.tolist()
        spans = [(0, s, e) for s, e in zip(cu[:-1], cu[1:])]
        if batch.num_padded_tokens:
            spans = spans[:-1]  # the padding segment
    else:
        spans = [(i, 0, batch.input_ids.shape[1]) for i in range(batch.input_ids.shape[0])]
    for row, s, e in spans:
        keep = batch.loss_mask[row, s:e].bool()
        out.append(losses[row, s:e][keep])
    return out


def thd_and_padded(model, samples: list[dict], multiple: int):
    """(THD per-sample losses, padded per-sample losses) for `samples`."""
    thd = collate_padding_free(samples, pad_id=0, multiple=multiple)
    pad = collate_padded(unpacked(samples), pad_id=0, multiple=multiple)
    return per_sample(thd, token_losses(model, thd)), per_sample(pad, token_losses(model, pad))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    assert all(x.shape == y.shape for x, y in zip(a, b)), [(x.shape, y.shape) for x, y in zip(a, b)]
    return max((x - y).abs().max().item() if x.numel() else 0.0 for x, y in zip(a, b))


def main(argv: list[str]) -> int:
    from megaswift.runtime.distributed import destroy_distributed, init_distributed

    src, ref_file = argv
    reference = torch.load(ref_file, weights_only=True)["losses"]
    parallel = ParallelArgs(tensor_model_parallel_size=2, sequence_parallel=True)
    info = init_distributed(parallel)
    try:
        model, config = build_model(src, parallel)
        assert config.sequence_parallel
        multiple = pad_multiple(2, True, 1)
        samples = make_samples()
        # 51 tokens: the THD batch gets a 1-token padding segment, so each rank holds 26
        assert collate_padding_free(samples, pad_id=0, multiple=multiple).num_padded_tokens == 1
        thd, padded = thd_and_padded(model, samples, multiple)
        even = samples[1:]  # 32 tokens: no padding segment
        thd_even, _ = thd_and_padded(model, even, multiple)
        diffs = {"thd_vs_padded": max_diff(thd, padded), "thd_vs_tp1": max_diff(thd, reference),
                 "padded_vs_tp1": max_diff(padded, reference),
                 "thd_even_vs_tp1": max_diff(thd_even, reference[-len(thd_even):])}
        ok = all(d <= ATOL for d in diffs.values())
        print(f"[rank {info.rank}] tp=2 sp=True "
              + " ".join(f"{k}={v:.3e}" for k, v in diffs.items()) + (" OK" if ok else " FAIL"),
              flush=True)
        return 0 if ok else 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
