"""`megatron export` arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class ExportArgs:
    """Conversion between HF folders and megatron-core distributed checkpoints."""
    model: Optional[str] = field(default=None, metadata={"help": "HF model: a local directory (or hub id, needs network)."})
    load: Optional[str] = field(default=None, metadata={"help": "MCore checkpoint directory to read (for --to_hf)."})
    save: str = field(default="", metadata={"help": "Output directory (must not exist yet)."})
    to_mcore: bool = field(default=False, metadata={"help": "Convert --model to an MCore torch_dist checkpoint."})
    to_hf: bool = field(default=False, metadata={"help": "Convert --load to an HF safetensors folder."})
    to_cached_dataset: bool = field(default=False, metadata={"help": "Tokenise (and pack) --dataset once into --save for --cached_dataset."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "Weights dtype (default: the source's).", "choices": DTYPES})
    test_convert_precision: bool = field(default=False, metadata={"help": "Compare HF and MCore logits in float32; exit 1 past the threshold."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors file written by --to_hf."})
    make_vocab_size_divisible_by: int = field(default=128, metadata={"help": "Pad the vocab rows to a multiple of this."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (off unless asked)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --save directory."})

    def __post_init__(self) -> None:
        if self.to_mcore + self.to_hf + self.to_cached_dataset != 1:
            raise ValueError("pass exactly one of --to_mcore true, --to_hf true or --to_cached_dataset true")
        if self.to_cached_dataset and not self.model:
            raise ValueError("--to_cached_dataset needs --model <hf_dir> (its tokenizer and chat template)")
        if not self.save:
            raise ValueError("--save is required: the output directory")
        if self.to_mcore and not self.model:
            raise ValueError("--to_mcore needs --model <hf_dir>")
        if self.to_hf and not self.load:
            raise ValueError("--to_hf needs --load <mcore_dir> (written by --to_mcore or training)")
