"""A training command's flags: every argument group of `megatron pt` / `megatron sft`, parsed once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from megaswift.args.data import DataArgs
from megaswift.args.megatron import ArchArgs, MegatronArgs, SwiftArgs, check_flags
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
    megatron: MegatronArgs = dataclasses.field(default_factory=MegatronArgs)
    arch: ArchArgs = dataclasses.field(default_factory=ArchArgs)
    swift: SwiftArgs = dataclasses.field(default_factory=SwiftArgs)

    def as_record(self) -> dict:
        """Every flag, by group (what `args.json` keeps of the run)."""
        return {"mode": self.mode, **{k: dataclasses.asdict(getattr(self, g)) for k, g in (
            ("model_args", "model"), ("parallel", "parallel"), ("data", "data"), ("train", "train"),
            ("runtime", "runtime"), ("tuner", "tuner"), ("rlhf", "rlhf"), ("moe", "moe"), ("megatron", "megatron"),
            ("arch", "arch"), ("swift", "swift")) if getattr(self, g) is not None}}


GROUPS = (ModelArgs, ParallelArgs, DataArgs, TrainArgs, RuntimeArgs, TunerArgs, MoEArgs, MegatronArgs, ArchArgs,
          SwiftArgs)


def parse_job(argv: list[str], mode: str) -> Job:
    groups = GROUPS + ((RLHFArgs,) if mode == "rlhf" else ())
    model, parallel, data, train, runtime, tuner, moe, megatron, arch, swift, *rest = parse(
        groups, argv, prog=f"megatron {mode}")
    rlhf = rest[0] if rest else None
    if megatron.logging_level is not None:
        from megaswift.logging_utils import set_level

        set_level(megatron.logging_level)
    check_flags((model, parallel, data, train, runtime, tuner, moe, megatron, arch, swift, *rest), explicit)
    if train.save is None:  # Megatron-SWIFT: never "nothing saved"
        train.save = str(Path("megatron_output") / Path(str(model.model or model.load)).expanduser().resolve().name)
    if data.split_dataset_ratio and "split_dataset_ratio" not in explicit(data) and (
            data.streaming or data.val_dataset or data.cached_dataset):
        # the seed's default 0.01 holds rows out of a --dataset that can be split; a stream cannot be
        # (its length is unknown), and --val_dataset / a cached dataset bring their own validation rows
        from megaswift.logging_utils import log

        if data.streaming and not data.val_dataset:
            log(f"--split_dataset_ratio {data.split_dataset_ratio} (the default) does not apply to --streaming "
                "true: no validation set (pass --val_dataset for one)")
        data.split_dataset_ratio = 0.0
    if data.streaming and (data.val_dataset or data.split_dataset_ratio) and train.eval_iters < 1:
        raise ValueError("--streaming true with a validation set needs --eval_iters N (a stream's length is "
                         "unknown, so -1 cannot mean 'all of it')")
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
    return Job(model, parallel, data, train, mode, runtime, tuner, rlhf, moe, megatron, arch, swift)
