"""`megatron sft`: supervised fine-tuning (assistant tokens trained)."""

from megaswift.training.trainer import run as _run


def run(argv: list[str]) -> int:
    return _run(argv, mode="sft")
