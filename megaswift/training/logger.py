"""Training logs: a console line with rate and ETA, TensorBoard scalars and `logging.jsonl`.

Only the writer rank (the last global rank, which sits on the last pipeline stage and holds the
data-parallel-reduced loss) writes; `logging.jsonl` has one JSON object per log step with at least
`iteration` and `loss` (evaluations: `eval_<figure>`), so scripts can read it; a run's first line
holds the figures known at its start (`trainable_params`, `total_params`), without `loss`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import psutil


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainLogger:
    def __init__(self, save_dir: Optional[Path], tensorboard_dir: Optional[str], writer: bool, total_iters: int,
                 options=None):
        """`options`: the logging flags (MegatronArgs: tensorboard_queue_size, what to leave out)."""
        self.writer, self.total = writer, total_iters
        self.options = options
        self.jsonl = None
        self.tb = None
        self.t_start = self.t_last = time.time()
        self.tokens_since = 0
        self.iters_since = 0
        if not writer:
            return
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(save_dir / "logging.jsonl", "a", buffering=1)
        tb_dir = tensorboard_dir or (str(save_dir / "runs") if save_dir is not None else None)
        if tb_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tb_dir, max_queue=getattr(options, "tensorboard_queue_size", 10))

    def step(self, real_tokens: int) -> None:
        """Count one optimizer step's real (non-padding) tokens for the throughput figure."""
        self.tokens_since += real_tokens
        self.iters_since += 1

    def log(self, iteration: int, record: dict, start_iteration: int = 0, console: bool = True,
            write: bool = True) -> None:
        """`console`: print the progress line (--log_interval); `write`: tensorboard and
        logging.jsonl (--tensorboard_log_interval)."""
        now = time.time()
        dt = now - self.t_last
        record = dict(record)
        record.update(
            iteration=iteration,
            seconds_per_iteration=round(dt / max(self.iters_since, 1), 4),
            tokens_per_second=round(self.tokens_since / max(dt, 1e-9), 2),
            memory_rss_gib=round(psutil.Process().memory_info().rss / 2**30, 3),
        )
        done = iteration - start_iteration
        eta = (now - self.t_start) / max(done, 1) * (self.total - iteration)
        self.t_last, self.tokens_since, self.iters_since = now, 0, 0
        if not self.writer:
            return
        opt = self.options
        if opt is not None:
            if opt.no_log_learning_rate_to_tensorboard:
                record.pop("lr", None)
            if not opt.log_timers_to_tensorboard:
                record.pop("seconds_per_iteration", None)
            if not opt.log_memory_to_tensorboard:
                record.pop("memory_rss_gib", None)
        line = (f"[{iteration}/{self.total} {100 * iteration / self.total:5.1f}%] loss {record['loss']:.4f} "
                f"lr {record.get('lr', 0):.3e} grad_norm {record.get('grad_norm', 0):.3f} "
                f"{record['tokens_per_second']:.1f} tok/s {record.get('seconds_per_iteration', 0):.2f} s/it "
                f"mem {record.get('memory_rss_gib', 0):.2f} GiB ETA {_fmt_eta(eta)}")
        for key, short in (("load_balancing_loss", "lb_loss"), ("seq_load_balancing_loss", "seq_lb_loss"),
                           ("z_loss", "z_loss"), ("moe_load_cv", "expert_load_cv")):
            if key in record:
                line += f" {short} {record[key]:.4f}"
        if "tflops_per_device" in record:
            line += f" {record['tflops_per_device']:.3f} TFLOP/s/dev"
        if console:
            print(line, file=sys.stderr, flush=True)
        if not write:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"train/{k}", v, iteration)

    def log_start(self, iteration: int, record: dict) -> None:
        """Figures known at the start of a run (parameter counts), one `logging.jsonl` line."""
        if self.writer and self.jsonl:
            self.jsonl.write(json.dumps({"iteration": iteration, **record}) + "\n")
        if self.writer and self.tb:
            for k, v in record.items():
                self.tb.add_scalar(f"model/{k}", v, iteration)

    def log_eval(self, iteration: int, metrics: dict) -> None:
        """The method's evaluation figures, logged as ``eval_<name>``."""
        if not self.writer:
            return
        if "loss" in metrics and getattr(self.options, "log_validation_ppl_to_tensorboard", True):
            import math

            metrics = {**metrics, "ppl": math.exp(min(metrics["loss"], 50.0))}
        record = {"iteration": iteration, **{f"eval_{k}": v for k, v in metrics.items()}}
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"[eval @ {iteration}] {shown}", file=sys.stderr, flush=True)
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, iteration)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
