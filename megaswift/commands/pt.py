"""`megatron pt`: pretraining / continued pretraining (every token trained)."""

from megaswift.training.trainer import run as _run


def run(argv: list[str]) -> int:
    return _run(argv, mode="pt")
