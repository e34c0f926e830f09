"""`megatron pt`: pretraining / continued pretraining (plain text, every token trained)."""

from megaswift.args.job import parse_job
from megaswift.training.trainer import train


def run(argv: list[str]) -> int:
    job = parse_job(argv, "pt")
    # as Megatron-SWIFT's pt: the plain-text template, and every token trained
    job.data.template = job.data.template or "default"
    job.data.loss_scale = "all" if job.data.loss_scale == "default" else job.data.loss_scale
    return train(job)
