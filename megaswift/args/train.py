"""Training arguments (Megatron-SWIFT / Megatron-LM names and defaults where they exist)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional


@dataclass(kw_only=True)
class ModelArgs:
    """Where the weights come from."""
    model: Optional[str] = field(default=None, metadata={"help": "HF model directory (converted in memory)."})
    load: Optional[str] = field(default=None, metadata={"help": "MCore checkpoint to start from or resume."})
    finetune: bool = field(default=False, metadata={"help": "With --load: weights only, iteration 0, data from the start."})
    no_load_optim: bool = field(default=False, metadata={"help": "Resume from --load without its optimizer state (fresh optimizer; iteration and schedule kept)."})
    no_load_rng: bool = field(default=False, metadata={"help": "Resume from --load without its RNG state."})
    torch_dtype: Optional[str] = field(default=None, metadata={"help": "float32|bfloat16|float16 (default: --bf16/--fp16, else the model's)."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16 (fp32 master weights in the optimizer)."})
    fp16: bool = field(default=False, metadata={"help": "Train in float16 with loss scaling."})
    make_vocab_size_divisible_by: int = field(default=128, metadata={"help": "Pad vocab rows to a multiple of this."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})

    def __post_init__(self) -> None:
        if not (self.model or self.load):
            raise ValueError("pass --model <hf_dir> or --load <mcore_checkpoint>")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are exclusive")


@dataclass(kw_only=True)
class TrainArgs:
    """Batch sizes, schedule, optimizer, recompute, logging and checkpoints."""
    micro_batch_size: int = field(default=1, metadata={"help": "Samples per micro-batch per data-parallel rank."})
    global_batch_size: int = field(default=16, metadata={"help": "Samples per optimizer step over all data-parallel ranks."})
    train_iters: Optional[int] = field(default=None, metadata={"help": "Optimizer steps (or use --max_epochs)."})
    max_epochs: Optional[int] = field(default=None, metadata={"help": "Epochs over the data: sets --train_iters when it is not given, and stops training when reached even with --train_iters (Megatron-SWIFT)."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    lr: Optional[float] = field(default=None, metadata={"help": "Peak learning rate (default 1e-5 full, 1e-4 LoRA)."})
    min_lr: float = field(default=0.0, metadata={"help": "Floor of the decayed learning rate."})
    lr_decay_style: str = field(default="cosine", metadata={"help": "cosine|linear|constant|WSD|inverse-square-root (megatron-core's scheduler).", "choices": ("cosine", "linear", "constant", "WSD", "inverse-square-root")})
    lr_wsd_decay_style: str = field(default="exponential", metadata={"help": "The annealing phase of --lr_decay_style WSD (Megatron-LM's).", "choices": ("exponential", "linear", "cosine", "minus_sqrt")})
    lr_wsd_decay_iters: Optional[int] = field(default=None, metadata={"help": "Annealing steps at the end of --lr_decay_iters with --lr_decay_style WSD (required there)."})
    lr_warmup_iters: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_warmup_fraction: Optional[float] = field(default=None, metadata={"help": "Warm-up as a fraction of --lr_decay_iters."})
    lr_decay_iters: Optional[int] = field(default=None, metadata={"help": "Decay steps (default --train_iters)."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    clip_grad: float = field(default=1.0, metadata={"help": "Gradient norm clipping (0 disables)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1."})
    adam_beta2: float = field(default=0.95, metadata={"help": "Adam beta2."})
    adam_eps: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD momentum (--optimizer sgd)."})
    optimizer: str = field(default="adam", metadata={"help": "adam|sgd", "choices": ("adam", "sgd")})
    use_distributed_optimizer: bool = field(default=True, metadata={"help": "Shard optimizer state over data-parallel ranks."})
    overlap_grad_reduce: bool = field(default=False, metadata={"help": "Overlap gradient reduce-scatter with backward."})
    overlap_param_gather: bool = field(default=False, metadata={"help": "Overlap parameter all-gather with forward."})
    optimizer_cpu_offload: bool = field(default=False, metadata={"help": "Keep optimizer state and its update on the CPU (GPU runs; needs --optimizer adam and the distributed optimizer)."})
    optimizer_offload_fraction: float = field(default=1.0, metadata={"help": "Share of the optimizer state offloaded with --optimizer_cpu_offload."})
    calculate_per_token_loss: bool = field(default=True, metadata={"help": "Average the loss over all trained tokens of the global batch."})
    recompute_granularity: Optional[str] = field(default="selective", metadata={"help": "full|selective|none: full recomputes whole layers (with --recompute_method/--recompute_num_layers), selective the --recompute_modules; none keeps every activation.", "choices": ("full", "selective", "none")})
    recompute_method: Optional[str] = field(default=None, metadata={"help": "uniform|block", "choices": ("uniform", "block")})
    recompute_num_layers: Optional[int] = field(default=None, metadata={"help": "Layers per recompute unit (full)."})
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"], metadata={"help": "Modules recomputed with selective granularity."})
    eval_interval: Optional[int] = field(default=None, metadata={"help": "Evaluate every N steps and at the end of training (default: --save_interval)."})
    eval_iters: int = field(default=-1, metadata={"help": "Validation batches per evaluation (-1: the whole validation set)."})
    log_interval: int = field(default=5, metadata={"help": "Print a progress line every N steps (tensorboard and logging.jsonl follow --tensorboard_log_interval)."})
    log_throughput: bool = field(default=False, metadata={"help": "Also log model TFLOP/s per device."})
    tensorboard_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard logs (default <save>/runs)."})
    save: Optional[str] = field(default=None, metadata={"help": "Checkpoint directory (default: megatron_output/<model directory name>)."})
    save_interval: int = field(default=500, metadata={"help": "Save every N steps (and always at the end)."})
    no_save_optim: bool = field(default=False, metadata={"help": "Do not save optimizer state."})
    no_save_rng: bool = field(default=False, metadata={"help": "Do not save RNG state."})
    add_version: bool = field(default=True, metadata={"help": "Save into <save>/vN-<timestamp> (Megatron-SWIFT)."})

    def __post_init__(self) -> None:
        if self.train_iters is None and self.max_epochs is None:
            raise ValueError("pass --train_iters N or --max_epochs N")
        if self.train_iters is not None and self.train_iters < 1:
            raise ValueError(f"--train_iters {self.train_iters} must be >= 1")
        if self.lr is not None and (not math.isfinite(self.lr) or self.lr < 0):  # nan would train nothing, silently
            raise ValueError(f"--lr {self.lr} must be a finite number >= 0")
        decay = self.lr_decay_iters or self.train_iters
        if decay is not None and self.lr_warmup_iters >= decay:  # megatron's scheduler asserts it
            raise ValueError(f"--lr_warmup_iters {self.lr_warmup_iters} must be smaller than "
                             f"--lr_decay_iters/--train_iters {decay}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"--global_batch_size {self.global_batch_size} is not a multiple of "
                             f"--micro_batch_size {self.micro_batch_size}")
        if not 0.0 <= self.optimizer_offload_fraction <= 1.0:
            raise ValueError(f"--optimizer_offload_fraction {self.optimizer_offload_fraction} must be in [0, 1]")
        if self.optimizer_cpu_offload and not self.use_distributed_optimizer:
            raise ValueError("--optimizer_cpu_offload true needs --use_distributed_optimizer true "
                             "(megatron-core offloads the distributed optimizer's shards)")
        if self.lr_decay_style == "WSD" and not self.lr_wsd_decay_iters:
            raise ValueError("--lr_decay_style WSD needs --lr_wsd_decay_iters N (the annealing steps at the end)")
        if self.lr_wsd_decay_iters is not None and decay is not None and not 0 < self.lr_wsd_decay_iters <= decay:
            raise ValueError(f"--lr_wsd_decay_iters {self.lr_wsd_decay_iters} must be in [1, --lr_decay_iters/--train_iters {decay}]")
        if self.recompute_granularity == "none":
            self.recompute_granularity = None
        if self.save_interval < 1:
            raise ValueError(f"--save_interval must be >= 1, got {self.save_interval}")
        if self.eval_interval is None:
            self.eval_interval = self.save_interval
        if self.eval_interval < 1:
            raise ValueError(f"--eval_interval must be >= 1, got {self.eval_interval}")
        if self.eval_iters == 0 or self.eval_iters < -1:
            raise ValueError(f"--eval_iters {self.eval_iters}: pass N >= 1 batches, or -1 for the whole validation set")
        if self.log_interval < 1:
            raise ValueError(f"--log_interval must be >= 1, got {self.log_interval}")
        if self.recompute_method and self.recompute_granularity != "full":
            raise ValueError("--recompute_method needs --recompute_granularity full")
        if self.recompute_granularity == "full" and not self.recompute_method:
            self.recompute_method = "uniform"
        if self.recompute_granularity == "full" and not self.recompute_num_layers:
            self.recompute_num_layers = 1
