"""`megatron sft`: supervised fine-tuning (the template's trained tokens, assistant turns by default)."""

from megaswift.args.job import parse_job
from megaswift.training.trainer import train


def run(argv: list[str]) -> int:
    return train(parse_job(argv, "sft"))
