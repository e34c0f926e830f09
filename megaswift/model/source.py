"""Where a command's model comes from, resolved once: an HF folder (`--model`) or a megaswift
checkpoint (`--load`, with its `args.json` and `hf_config/`), and the dtype it runs in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megaswift.checkpointing import HF_CONFIG, CheckpointRecord
from megaswift.model.hf import HFModel, config_dtype, dtype_name, load_hf_config, parse_dtype, resolve_model_dir


@dataclass
class Source:
    """``dir`` holds config.json and the tokenizer; ``record`` is None for an HF model."""
    dir: Path
    hf_config: object
    record: Optional[CheckpointRecord]

    @property
    def is_checkpoint(self) -> bool:
        return self.record is not None

    def make_vocab_size_divisible_by(self, flag: int) -> int:
        """A checkpoint's vocab padding is fixed when it was written; an HF model takes the flag's."""
        return self.record.make_vocab_size_divisible_by if self.record else flag

    def model(self, make_vocab_size_divisible_by: int, tp: int) -> HFModel:
        return HFModel.from_config(self.hf_config, self.make_vocab_size_divisible_by(make_vocab_size_divisible_by),
                                   tp, self.record.padded_vocab_size if self.record else None)

    def checkpoint_record(self, model: HFModel, dtype: torch.dtype, make_vocab_size_divisible_by: int, parallel,
                          **extra) -> CheckpointRecord:
        """The `args.json` of a checkpoint of `model` written from this source at layout `parallel`."""
        return CheckpointRecord(
            family=model.family.name, torch_dtype=dtype_name(dtype), padded_vocab_size=model.dims.padded_vocab_size,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by(make_vocab_size_divisible_by),
            saved_with={"tensor_model_parallel_size": parallel.tensor_model_parallel_size,
                        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size},
            **extra)

    def dtype(self, torch_dtype: Optional[str] = None, *, bf16: bool = False, fp16: bool = False) -> torch.dtype:
        """`--bf16`/`--fp16`, else `--torch_dtype`, else the checkpoint's dtype, else config.json's."""
        if bf16:
            return torch.bfloat16
        if fp16:
            return torch.float16
        saved = self.record.torch_dtype if self.record else None
        return parse_dtype(torch_dtype, parse_dtype(saved, config_dtype(self.hf_config)))


def resolve_source(model: Optional[str], load: Optional[str], trust_remote_code: bool = False) -> Source:
    """`--model` (an HF folder or hub id) wins; else `--load` (a megaswift checkpoint)."""
    if model:
        src = resolve_model_dir(model)
        return Source(src, load_hf_config(src, trust_remote_code), None)
    root = Path(load).expanduser()
    record = CheckpointRecord.read(root)
    return Source(root / HF_CONFIG, load_hf_config(root / HF_CONFIG, trust_remote_code), record)
