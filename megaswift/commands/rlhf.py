"""`megatron rlhf --rlhf_type dpo`: preference training, every `sft` flag plus the DPO ones."""

from megaswift.args.job import parse_job
from megaswift.training.trainer import train


def run(argv: list[str]) -> int:
    return train(parse_job(argv, "rlhf"))
