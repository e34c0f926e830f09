"""Where a command's model comes from, resolved once: the weights (`--load`'s checkpoint when given,
else the HF folder of `--model`), the config.json and tokenizer that describe them, and the dtype.

`--load` is a megaswift checkpoint (its `args.json` record and `hf_config/`) or one Megatron-SWIFT
wrote (`swift export --to_mcore`, `megatron sft`): Megatron-LM's layout with ms-swift's
`args.json` and no config, which is taken from that args.json's `model_dir` / `model` when it is
a local HF folder. `--model` with `--load` means what it means to Megatron-SWIFT: config and
tokenizer from the HF model, weights (and a run's optimizer state) from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megaswift.checkpointing import (ARGS, HF_CONFIG, CheckpointRecord, is_megaswift_record, read_args, resolve,
                                     stored_shape)
from megaswift.converters.hf_io import CheckpointError
from megaswift.model.hf import HFModel, config_dtype, dtype_name, load_hf_config, parse_dtype, resolve_model_dir

EMBEDDING = "embedding.word_embeddings.weight"
SWIFT_VOCAB_MULTIPLE = 128
"""Megatron-LM's --make_vocab_size_divisible_by default, recorded for a Megatron-SWIFT checkpoint
whose rows it divides (1 otherwise). Descriptive only: the rows are what the checkpoint's index
stores, as ms-swift 3.8 sets padded_vocab_size itself (config.json's vocab_size, or a multiple of
128 with --new_special_tokens) and Megatron-LM never pads it."""


@dataclass
class Source:
    """``dir`` holds config.json and the tokenizer; ``record`` describes the `--load` checkpoint the
    weights come from (None: they come from the HF folder ``dir``); ``model_flag`` is `--model`."""
    dir: Path
    hf_config: object
    record: Optional[CheckpointRecord]
    model_flag: Optional[str] = None

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
                          source_model: Optional[str] = None, flags: Optional[dict] = None) -> CheckpointRecord:
        """The `args.json` of a checkpoint of `model` written from this source at layout `parallel`.

        `source_model` is the HF model this command read (`--model`), as before. ms-swift's `model` /
        `model_dir` name the HF model the weights descend from: `--model`'s folder when given, else what
        the `--load` checkpoint recorded (its hf_config/ holds no weights).
        """
        prior, flags = self.record, flags or {}
        name = source_model or self.model_flag or (prior and (prior.model or prior.source_model)) or None
        here = str(self.dir.expanduser().resolve())
        model_type = (flags.get("swift") or {}).get("model_type") or (prior.model_type if prior else None)
        return CheckpointRecord(
            family=model.family.name, torch_dtype=dtype_name(dtype), padded_vocab_size=model.dims.padded_vocab_size,
            make_vocab_size_divisible_by=self.make_vocab_size_divisible_by(make_vocab_size_divisible_by),
            saved_with={"tensor_model_parallel_size": parallel.tensor_model_parallel_size,
                        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size},
            source_model=source_model, model=name,
            model_dir=here if self.model_flag or prior is None else (prior.model_dir or here),
            model_type=model_type, flags=flags)

    def dtype(self, torch_dtype: Optional[str] = None, *, bf16: bool = False, fp16: bool = False) -> torch.dtype:
        """`--bf16`/`--fp16`, else `--torch_dtype`, else the checkpoint's dtype, else config.json's."""
        if bf16:
            return torch.bfloat16
        if fp16:
            return torch.float16
        saved = self.record.torch_dtype if self.record else None
        return parse_dtype(torch_dtype, parse_dtype(saved, config_dtype(self.hf_config)))


def resolve_source(model: Optional[str], load: Optional[str], trust_remote_code: bool = False) -> Source:
    """The weights from `--load` when given, else from `--model`; config.json and the tokenizer
    from `--model` when given, else from the checkpoint (see the module docstring)."""
    if not load:
        src = resolve_model_dir(model)
        return Source(src, load_hf_config(src, trust_remote_code), None, model)
    root = Path(load).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--load {load}: no such directory")
    data = read_args(root)
    if data is not None and is_megaswift_record(data):
        record = CheckpointRecord.read(root)
        src = resolve_model_dir(model) if model else root / HF_CONFIG
        hf_config = load_hf_config(src, trust_remote_code)
        if model:
            _check_family(model, load, hf_config, record.family)
        return Source(src, hf_config, record, model)
    src = resolve_model_dir(model) if model else _swift_config_dir(root, data, load)
    hf_config = load_hf_config(src, trust_remote_code)
    return Source(src, hf_config, swift_record(root, data or {}, hf_config, load), model)


def _check_family(model: str, load: str, hf_config, family: str) -> None:
    from megaswift.converters import family_for

    given = family_for(hf_config).name
    if given != family:
        raise ValueError(f"--model {model} is a {given} model but --load {load} holds a {family} checkpoint: "
                         f"pass the HF model the checkpoint was made from as --model (or drop --model)")


def _swift_config_dir(root: Path, data: Optional[dict], load: str) -> Path:
    """Where a checkpoint without hf_config/ keeps its config.json: the checkpoint directory
    itself, else ms-swift's args.json `model_dir` (the local HF folder it converted), else its
    `model` when that is a local folder. None of them: the error names `--model` as the fix."""
    candidates = [root]
    if data:
        candidates += [Path(str(data[k])).expanduser() for k in ("model_dir", "model")
                       if isinstance(data.get(k), str) and data[k]]
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    if data is None:
        raise FileNotFoundError(
            f"{root / ARGS} is missing and {root} holds no config.json (not written by megaswift or ms-swift's "
            "swift export): pass the HF model the checkpoint was converted from as --model <hf dir>")
    named = ", ".join(f"{k} {data[k]!r}" for k in ("model_dir", "model") if data.get(k)) or "no model"
    raise FileNotFoundError(
        f"--load {load}: no config.json for this checkpoint ({root / ARGS} names {named}, not a local HF folder "
        "here): pass the HF model it was converted from as --model <hf dir>")


def swift_record(root: Path, data: dict, hf_config, load: str) -> CheckpointRecord:
    """A megaswift record for a checkpoint Megatron-SWIFT or Megatron-LM wrote.

    The vocab rows are its args.json `padded_vocab_size` when that is set (ms-swift's training
    arguments), else the embedding rows its index stores (an export's args.json has none: ms-swift
    set Megatron-LM's padded_vocab_size to config.json's vocab_size, or more with new tokens).
    """
    from megaswift.converters import family_for

    ckpt = resolve(root)
    rows = stored_shape(ckpt, EMBEDDING)
    if rows is None:
        raise CheckpointError(f"--load {load}: {ckpt} holds no {EMBEDDING} (a LoRA run's adapters, or not a GPT "
                              "model): pass a full checkpoint as --load (a LoRA run's base, with its adapters "
                              "merged or exported to HF first)")
    padded = data.get("padded_vocab_size")
    if not isinstance(padded, int) or isinstance(padded, bool) or padded <= 0:
        padded = rows[0]
    elif padded != rows[0]:
        raise CheckpointError(f"--load {load}: {root / ARGS} records padded_vocab_size {padded} but {ckpt} stores "
                              f"{rows[0]} embedding rows: the args.json belongs to another checkpoint; restore its own")
    dtype = str(data.get("torch_dtype") or "").replace("torch.", "")  # ms-swift writes "bfloat16"
    divisible = data.get("make_vocab_size_divisible_by")
    if not isinstance(divisible, int) or divisible <= 0:
        divisible = SWIFT_VOCAB_MULTIPLE if padded % SWIFT_VOCAB_MULTIPLE == 0 else 1
    return CheckpointRecord(
        family=family_for(hf_config).name,
        torch_dtype=dtype if dtype in ("float32", "bfloat16", "float16") else dtype_name(config_dtype(hf_config)),
        padded_vocab_size=padded,
        make_vocab_size_divisible_by=divisible,
        source_model=data.get("model") or None, model=data.get("model") or None,
        model_dir=data.get("model_dir") or None, model_type=data.get("model_type") or None)
