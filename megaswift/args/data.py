"""Data arguments: sources, row formats, templates, truncation, batching and packing.

Names and semantics follow Megatron-SWIFT's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TRUNCATION = ("delete", "left", "right")
LOSS_SCALES = ("default", "last_round", "all", "ignore_empty_think")


class _ResolvedSystem(str):
    """A ``--system`` value already resolved by :func:`resolve_system` (``dataclasses.replace``
    runs ``__post_init__`` again: the prompt must not be resolved twice)."""

    def __reduce__(self):
        return (_ResolvedSystem, (str(self),))


def resolve_system(system: Optional[str]) -> Optional[str]:
    """``--system`` as ms-swift's TemplateArguments reads it: a value ending in ``.txt`` names a file
    whose content (UTF-8, as is) is the prompt, and must exist; in any other value a literal ``\\n``
    becomes a newline. Resolved once: a resolved value is returned unchanged."""
    if system is None or isinstance(system, _ResolvedSystem):
        return system
    if system.endswith(".txt"):
        path = Path(system).expanduser()
        if not path.is_file():
            raise ValueError(f"--system {system!r} ends in .txt but is not a file; ms-swift reads a .txt value "
                             "as the file holding the system prompt")
        try:
            return _ResolvedSystem(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"--system file {system} is not UTF-8 ({e.reason} at byte {e.start})") from e
    return _ResolvedSystem(system.replace("\\n", "\n"))


@dataclass(kw_only=True)
class DataArgs:
    """Datasets, chat template, loss masks, padding-free batches and packing."""
    dataset: list[str] = field(default_factory=list, metadata={"help": "Sources: .jsonl/.json/.csv/.parquet files, directories of them, `datasets` saved dirs or hub ids; `source#N` samples N rows."})
    val_dataset: list[str] = field(default_factory=list, metadata={"help": "Validation sources (same forms as --dataset)."})
    split_dataset_ratio: float = field(default=0.01, metadata={"help": "Fraction of --dataset held out for validation (at least one row) when --val_dataset is not given; 0: none. Not applied to --streaming."})
    data_seed: int = field(default=42, metadata={"help": "Seed for `#N` sampling, splits and shuffling."})
    columns: Optional[str] = field(default=None, metadata={"help": "JSON rename map applied to every row first, e.g. '{\"text1\": \"query\"}'."})
    dataset_num_proc: int = field(default=1, metadata={"help": "Processes for tokenisation."})
    strict: bool = field(default=False, metadata={"help": "true: the first bad row is an error naming file and row; false: bad rows are dropped and counted."})
    template: Optional[str] = field(default=None, metadata={"help": "ms-swift template name. chatml, default: built-in templates. qwen, qwen2, qwen2_5, qwen2_5_math, qwq_preview, qwq, qwen3, qwen3_thinking, qwen3_nothinking, llama3, llama3_1, llama3_2, llama3_3: the tokenizer's own chat template when it has one, else a built-in fallback (ChatML with the family's default system / Llama-3). Default: the tokenizer's own."})
    system: Optional[str] = field(default=None, metadata={"help": "System prompt that overrides the rows' and the template's; a value ending in .txt is a file whose content is the prompt (as in ms-swift), and in other values a literal \\n is a newline."})
    loss_scale: str = field(default="default", metadata={"help": "Which tokens are trained: default (every assistant turn; pt: every token; preference pairs: as last_round), last_round (the assistant turns after the last user turn), all, or ignore_empty_think (as default, but an empty <think>...</think> block opening an assistant turn is not trained).", "choices": LOSS_SCALES})
    max_length: Optional[int] = field(default=None, metadata={"help": "Longest tokenised sample."})
    truncation_strategy: str = field(default="delete", metadata={"help": "What to do with longer samples.", "choices": TRUNCATION})
    dataset_shuffle: bool = field(default=True, metadata={"help": "Shuffle the dataset: `#N` samples at random (false: the first N rows) and streams pass through a --shuffle_buffer_size buffer, re-seeded every epoch (false: read in order)."})
    shuffle_buffer_size: int = field(default=1000, metadata={"help": "Rows in the shuffle buffer of a --streaming dataset."})
    train_dataloader_shuffle: bool = field(default=True, metadata={"help": "Visit the (non-streaming) training rows in a new seeded order every epoch (false: in order). Streams are always read in order."})
    lazy_tokenize: bool = field(default=False, metadata={"help": "Tokenise on access instead of ahead of training."})
    streaming: bool = field(default=False, metadata={"help": "Read and tokenise sources as a stream while training (needs --train_iters; --max_epochs N stops after N passes). Combines with --packing (packed on the fly)."})
    padding_free: bool = field(default=True, metadata={"help": "Concatenate a micro-batch's samples (THD, cu_seqlens) instead of padding."})
    packing: bool = field(default=False, metadata={"help": "Bin-pack samples into sequences of --packing_length tokens."})
    packing_length: Optional[int] = field(default=None, metadata={"help": "Packed sequence length (default --max_length)."})
    model_name: list[str] = field(default_factory=list, metadata={"help": "Self-cognition: the model's name in Chinese and English, filling {{NAME}} in rows (tag zh: the first, others: the second; one value: both), e.g. --model_name 小黄 'Xiao Huang'."})
    model_author: list[str] = field(default_factory=list, metadata={"help": "Self-cognition: the author's name in Chinese and English, filling {{AUTHOR}} in rows like --model_name, e.g. --model_author 魔搭 ModelScope."})
    cached_dataset: list[str] = field(default_factory=list, metadata={"help": "Directories written by `megatron export --to_cached_dataset true`."})

    def __post_init__(self) -> None:
        self.system = resolve_system(self.system)
        for flag in ("model_name", "model_author"):
            values = getattr(self, flag)
            if isinstance(values, str):
                values = [values]
                setattr(self, flag, values)
            if len(values) > 2:
                raise ValueError(f"--{flag} takes one value, or two (Chinese, English), got {len(values)}")
        if self.columns is not None:
            try:
                cols = json.loads(self.columns)
            except json.JSONDecodeError as e:
                raise ValueError(f"--columns {self.columns!r} is not valid JSON ({e.msg}); "
                                 """write it like '{"text1": "query", "text2": "response"}'""") from e
            if not isinstance(cols, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cols.items()):
                raise ValueError(f"--columns must be a JSON object of column -> column names, got {self.columns!r}")
        if not 0.0 <= self.split_dataset_ratio < 1.0:
            raise ValueError(f"--split_dataset_ratio {self.split_dataset_ratio} must be in [0, 1)")
        if self.packing and not (self.packing_length or self.max_length):
            raise ValueError("--packing true needs --packing_length or --max_length")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"--max_length {self.max_length} is too small")
        if self.dataset_num_proc < 1:
            raise ValueError(f"--dataset_num_proc must be >= 1, got {self.dataset_num_proc}")
        if self.shuffle_buffer_size < 1:
            raise ValueError(f"--shuffle_buffer_size must be >= 1, got {self.shuffle_buffer_size}")
        if self.lazy_tokenize and self.packing:
            raise ValueError("--lazy_tokenize true cannot be combined with --packing true: packing needs every "
                             "sample's length up front (--streaming true --packing true packs on the fly)")
        if self.cached_dataset and (self.streaming or self.lazy_tokenize):
            raise ValueError("--cached_dataset is tokenised already: drop --streaming/--lazy_tokenize")

    @property
    def column_map(self) -> dict[str, str]:
        return json.loads(self.columns) if self.columns else {}

    @property
    def resolved_packing_length(self) -> Optional[int]:
        return self.packing_length or self.max_length
