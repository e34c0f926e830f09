"""A training command's flags: every argument group of `megatron pt` / `megatron sft`, parsed once."""

from __future__ import annotations

import dataclasses

from megaswift.args.data import DataArgs
from megaswift.args.parallel import ParallelArgs
from megaswift.args.parser import parse
from megaswift.args.runtime import RuntimeArgs
from megaswift.args.train import ModelArgs, TrainArgs
from megaswift.args.tuner import TunerArgs


@dataclasses.dataclass
class Job:
    model: ModelArgs
    parallel: ParallelArgs
    data: DataArgs
    train: TrainArgs
    mode: str          # the command: "pt" or "sft"
    runtime: RuntimeArgs
    tuner: TunerArgs = dataclasses.field(default_factory=TunerArgs)

    def as_record(self) -> dict:
        """Every flag, by group (what `args.json` keeps of the run)."""
        return {"mode": self.mode, **{k: dataclasses.asdict(getattr(self, g)) for k, g in (
            ("model_args", "model"), ("parallel", "parallel"), ("data", "data"), ("train", "train"),
            ("runtime", "runtime"), ("tuner", "tuner"))}}


def parse_job(argv: list[str], mode: str) -> Job:
    model, parallel, data, train, runtime, tuner = parse(
        (ModelArgs, ParallelArgs, DataArgs, TrainArgs, RuntimeArgs, TunerArgs), argv, prog=f"megatron {mode}")
    if not data.dataset and not data.cached_dataset:
        raise ValueError("pass --dataset <files> or --cached_dataset <dir>")
    if train.lr is None:  # Megatron-SWIFT's defaults
        train.lr = 1e-4 if tuner.lora else 1e-5
    return Job(model, parallel, data, train, mode, runtime, tuner)
