"""A training command's flags: every argument group of `megatron pt` / `megatron sft`, parsed once."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megaswift.args.data import DataArgs
from megaswift.args.moe import MoEArgs
from megaswift.args.parallel import ParallelArgs
from megaswift.args.parser import explicit, parse
from megaswift.args.rlhf import RLHFArgs
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
    rlhf: Optional[RLHFArgs] = None    # `megatron rlhf` only
    moe: MoEArgs = dataclasses.field(default_factory=MoEArgs)

    def as_record(self) -> dict:
        """Every flag, by group (what `args.json` keeps of the run)."""
        return {"mode": self.mode, **{k: dataclasses.asdict(getattr(self, g)) for k, g in (
            ("model_args", "model"), ("parallel", "parallel"), ("data", "data"), ("train", "train"),
            ("runtime", "runtime"), ("tuner", "tuner"), ("rlhf", "rlhf"), ("moe", "moe")) if getattr(self, g) is not None}}


def parse_job(argv: list[str], mode: str) -> Job:
    groups = (ModelArgs, ParallelArgs, DataArgs, TrainArgs, RuntimeArgs, TunerArgs, MoEArgs) + (
        (RLHFArgs,) if mode == "rlhf" else ())
    model, parallel, data, train, runtime, tuner, moe, *rest = parse(groups, argv, prog=f"megatron {mode}")
    rlhf = rest[0] if rest else None
    if not data.dataset and not data.cached_dataset:
        raise ValueError("pass --dataset <files> or --cached_dataset <dir>")
    if train.lr is None:  # Megatron-SWIFT's defaults
        train.lr = 1e-4 if tuner.lora else 1e-5
    if rlhf is not None:  # Megatron-SWIFT's rlhf overrides
        if "calculate_per_token_loss" not in explicit(train):
            train.calculate_per_token_loss = False
        if "loss_scale" not in explicit(data):
            data.loss_scale = "last_round"
        if data.cached_dataset:
            raise ValueError("--cached_dataset holds tokenised sft/pt rows; megatron rlhf reads --dataset")
    return Job(model, parallel, data, train, mode, runtime, tuner, rlhf, moe)
