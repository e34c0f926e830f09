"""Everything the model side needs from an HF folder: config, dtype, family, dims, files to carry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megaswift.converters import FAMILIES, Family, family_for
from megaswift.converters.mappings import ModelDims
from megaswift.model.builder import padded_vocab_size
from megaswift.model.config import head_dim, num_kv_heads

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_dir(model: str) -> Path:
    """A local HF folder for `model`: the directory itself, or a hub download (needs network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"--model {model}: no config.json in that directory")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"--model {model}: not a directory (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                               "*.txt", "*.jinja", "*.py"]))
    except Exception as e:
        raise FileNotFoundError(
            f"--model {model}: not a local directory, and the hub download failed ({type(e).__name__}: "
            f"{e}). This machine may be offline (HF_HUB_OFFLINE or no network to the hub): "
            f"download the model elsewhere and pass its local directory as --model <dir> (ModelScope ids, "
            "which Megatron-SWIFT reads without --use_hf true, are fetched from the Hugging Face hub here)") from e


def load_hf_config(model_dir: Path, trust_remote_code: bool = False):
    """transformers' config, after megaswift's own look at config.json: transformers answers a
    malformed file with a traceback and an unknown `model_type` with advice to upgrade itself."""
    from transformers import AutoConfig

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pass an HF model directory (or a megaswift checkpoint)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix it") from None
    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    if model_type not in supported:
        raise ValueError(f"model_type {model_type!r} in {path} is not supported; supported model "
                         f"types: {', '.join(supported)}")
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def config_dtype(hf_config) -> torch.dtype:
    """The dtype the HF config declares for its weights (float32 when it says nothing)."""
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return _DTYPES.get(str(dt).replace("torch.", ""), torch.float32)


def parse_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return _DTYPES[name] if name else default


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


@dataclass(frozen=True)
class HFModel:
    """An HF model as megaswift sees it: config, family and the numbers converters need."""
    config: object
    family: Family
    dims: ModelDims

    @classmethod
    def from_config(cls, hf_config, make_vocab_size_divisible_by: int, tp: int,
                    padded_vocab: int | None = None) -> "HFModel":
        """`padded_vocab` (from a checkpoint's args.json) wins over recomputing it."""
        family = family_for(hf_config)
        if padded_vocab is None:
            padded_vocab = padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp)
        elif padded_vocab % tp:
            raise ValueError(f"the checkpoint's padded vocab size {padded_vocab} does not split over "
                             f"--tensor_model_parallel_size {tp}; use a TP size that divides it")
        dims = ModelDims(
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=num_kv_heads(hf_config),
            head_dim=head_dim(hf_config),
            vocab_size=hf_config.vocab_size,
            padded_vocab_size=padded_vocab,
        )
        return cls(hf_config, family, dims)
