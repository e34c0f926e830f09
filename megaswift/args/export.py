"""`megatron export` arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class ExportArgs:
    """Conversion between HF folders and megatron-core distributed checkpoints."""
    model: Optional[str] = field(default=None, metadata={"help": "HF model: a local directory (or hub id, needs network). With --to_hf: where config.json and the tokenizer come from (default: the checkpoint's)."})
    load: Optional[str] = field(default=None, metadata={"help": "MCore checkpoint directory to read (for --to_hf).", "aliases": ("mcore_model",)})
    save: str = field(default="", metadata={"help": "Output directory, not existing yet (default: <model>-mcore for --to_mcore, <load>-hf for --to_hf, as ms-swift).", "aliases": ("output_dir",)})
    to_mcore: bool = field(default=False, metadata={"help": "Convert --model to an MCore torch_dist checkpoint."})
    to_hf: bool = field(default=False, metadata={"help": "Convert --load to an HF safetensors folder."})
    to_cached_dataset: bool = field(default=False, metadata={"help": "Tokenise (and pack) --dataset once into --save for --cached_dataset."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "Weights dtype (default: the source's).", "choices": DTYPES})
    test_convert_precision: bool = field(default=False, metadata={"help": "Compare HF and MCore logits in float32; exit 1 past the threshold."})
    max_shard_size: str = field(default="5GB", metadata={"help": "Largest safetensors file written by --to_hf."})
    make_vocab_size_divisible_by: int = field(default=128, metadata={"help": "Pad the vocab rows to a multiple of this."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint (off unless asked)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing --save directory.", "aliases": ("exist_ok",)})
    # LoRA
    adapter_load: Optional[str] = field(default=None, metadata={"help": "A megaswift LoRA run (its --save) to export with --to_hf: a PEFT adapter folder, or with --merge_lora true an HF model with the adapter merged. Its base: --model / --load, else the one the run recorded."})
    adapters: list[str] = field(default_factory=list, metadata={"help": "A PEFT LoRA folder to import with --to_mcore as a megaswift LoRA checkpoint (for --adapter_load); --model is its base (default: its base_model_name_or_path)."})
    merge_lora: bool = field(default=False, metadata={"help": "With --adapter_load: fold the adapter into the base weights and write an HF model, instead of a PEFT adapter folder."})

    def __post_init__(self) -> None:
        if self.to_mcore + self.to_hf + self.to_cached_dataset != 1:
            raise ValueError("pass exactly one of --to_mcore true, --to_hf true or --to_cached_dataset true")
        if self.to_cached_dataset and not self.model:
            raise ValueError("--to_cached_dataset needs --model <hf_dir> (its tokenizer and chat template)")
        if not self.save:   # ms-swift's default output directory
            from pathlib import Path

            base = self.model if self.to_mcore or self.to_cached_dataset else (self.load or self.adapter_load)
            if not base:
                raise ValueError("--save is required: the output directory")
            suffix = "-mcore" if self.to_mcore else "-hf" if self.to_hf else "-cached"
            self.save = str(Path(base).expanduser().resolve().name) + suffix
        if self.adapters:
            if not self.to_mcore:
                raise ValueError("--adapters (a PEFT folder) imports with --to_mcore true; a megaswift LoRA run "
                                 "exports to HF with --adapter_load <run> --to_hf true")
            if len(self.adapters) > 1:
                raise ValueError(f"--adapters takes one PEFT folder, got {len(self.adapters)}; import them one by one")
            if self.adapter_load:
                raise ValueError("pass --adapters <peft_dir> (import) or --adapter_load <lora run> (export), not both")
            if self.merge_lora:
                raise ValueError("--merge_lora true with --adapters: import the PEFT folder without it, then "
                                 "`megatron export --adapter_load <imported> --to_hf true --merge_lora true`")
        if self.adapter_load and not self.to_hf:
            raise ValueError("--adapter_load exports a LoRA run with --to_hf true (a PEFT folder, or with "
                             "--merge_lora true the merged HF model)")
        if self.merge_lora and not self.adapter_load:
            raise ValueError("--merge_lora true needs --adapter_load <lora run> (the adapter to merge into "
                             "its base); a full checkpoint exports with --load alone")
        if self.test_convert_precision and (self.adapters or (self.adapter_load and not self.merge_lora)):
            raise ValueError("--test_convert_precision compares a whole model: with a LoRA adapter it needs "
                             "--adapter_load <run> --merge_lora true")
        if self.to_mcore and not self.model and not self.adapters:
            raise ValueError("--to_mcore needs --model <hf_dir>")
        if self.to_hf and not self.load and not self.adapter_load:
            raise ValueError("--to_hf needs --load <mcore_dir> (written by --to_mcore or training), or "
                             "--adapter_load <lora run>")
