"""Per-family HF <-> MCore mappings, declared as data (see `family.py`)."""

from megaswift.converters.deepseek import DEEPSEEK_V2, DEEPSEEK_V3
from megaswift.converters.family import Family
from megaswift.converters.llama import LLAMA, MISTRAL
from megaswift.converters.mixtral import MIXTRAL
from megaswift.converters.qwen import QWEN2, QWEN2_MOE, QWEN3, QWEN3_MOE

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN2_MOE, QWEN3_MOE, MIXTRAL, DEEPSEEK_V2,
                                 DEEPSEEK_V3)


def family_for(hf_config) -> Family:
    """The family for an HF config's `model_type`, or a ValueError listing the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            fam.check(hf_config)
            return fam
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} in config.json is not supported; supported: {supported}")
