"""Dataclass argument groups -> argparse, with Megatron-SWIFT's `--flag true|false` booleans.

`--help` lists the flags under the sections of Megatron-SWIFT's argument docs (training, learning
rate, ..., template), each with its default. A mistyped flag is one line naming the closest known
ones; every parse error is one line, `megatron <cmd>: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Union, get_args, get_origin

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}

# Megatron-SWIFT's sections, in its docs' order, then ms-swift's inherited ones and megaswift's.
SECTIONS = ("training", "learning rate", "regularization", "checkpoint", "distributed", "logging",
            "evaluation", "fp8", "mixed precision", "model", "moe", "mla", "tuner", "dpo", "rlhf",
            "base", "data", "template", "export")

# flag -> section where the flag's dataclass does not say it (Megatron-SWIFT files these flags
# under another section than the group megaswift keeps them in)
_SECTION_OF = {
    **dict.fromkeys(("micro_batch_size", "global_batch_size", "recompute_granularity", "recompute_method",
                     "recompute_num_layers", "recompute_modules", "train_iters", "log_interval", "tensorboard_dir",
                     "calculate_per_token_loss", "attention_backend", "optimizer", "optimizer_cpu_offload",
                     "optimizer_offload_fraction", "seed", "add_version", "padding_free", "packing",
                     "packing_length", "streaming", "lazy_tokenize", "cached_dataset", "max_epochs",
                     "deterministic_mode", "no_masked_softmax_fusion", "no_bias_dropout_fusion",
                     "no_bias_swiglu_fusion", "no_rope_fusion", "no_gradient_accumulation_fusion",
                     "cross_entropy_loss_fusion", "cross_entropy_fusion_impl", "use_precision_aware_optimizer",
                     "main_grads_dtype", "main_params_dtype", "exp_avg_dtype", "exp_avg_sq_dtype",
                     "dataloader_type", "manual_gc", "manual_gc_interval", "num_workers", "seq_length",
                     "use_cpu_initialization", "extra_megatron_kwargs", "mlp_padding_free",
                     "vit_gradient_checkpointing", "gradient_checkpointing_kwargs", "enable_dft_loss",
                     "enable_channel_loss"), "training"),
    **dict.fromkeys(("lr", "lr_decay_style", "lr_decay_iters", "lr_warmup_iters", "lr_warmup_fraction",
                     "min_lr"), "learning rate"),
    **dict.fromkeys(("weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "sgd_momentum"),
                    "regularization"),
    **dict.fromkeys(("save", "save_interval", "no_save_optim", "no_save_rng", "load", "no_load_optim",
                     "no_load_rng", "finetune", "ckpt_format", "no_initialization", "auto_detect_ckpt_format",
                     "exit_on_missing_checkpoint", "use_distributed_optimizer"), "checkpoint"),
    **dict.fromkeys(("distributed_backend", "tp_comm_overlap", "overlap_grad_reduce", "overlap_param_gather",
                     "distributed_timeout_minutes", "use_distributed_optimizer"), "distributed"),
    **dict.fromkeys(("log_params_norm", "log_throughput", "tensorboard_log_interval", "tensorboard_queue_size",
                     "log_timers_to_tensorboard", "no_log_learning_rate_to_tensorboard",
                     "log_validation_ppl_to_tensorboard", "log_memory_to_tensorboard", "logging_level",
                     "wandb_project", "wandb_exp_name", "wandb_save_dir"), "logging"),
    **dict.fromkeys(("eval_iters", "eval_interval"), "evaluation"),
    **dict.fromkeys(("fp8_format", "fp8_recipe", "fp8_amax_history_len", "fp8_amax_compute_algo",
                     "fp8_param_gather"), "fp8"),
    **dict.fromkeys(("fp16", "bf16", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
                     "torch_dtype"), "mixed precision"),
    **dict.fromkeys(("transformer_impl", "make_vocab_size_divisible_by", "multi_latent_attention"), "model"),
    **dict.fromkeys(("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                     "qk_pos_emb_head_dim"), "mla"),
    **dict.fromkeys(("freeze_llm", "freeze_vit", "freeze_aligner"), "tuner"),
    **dict.fromkeys(("loss_scale",), "template"),
    **dict.fromkeys(("model", "trust_remote_code", "tuner_backend", "adapters", "external_plugins",
                     "custom_register_path", "model_kwargs", "load_args", "load_data_args", "use_hf",
                     "hub_token", "ddp_timeout", "ddp_backend", "ignore_args_error", "model_type",
                     "model_revision", "task_type", "num_labels", "problem_type", "attn_impl", "device_map",
                     "max_memory", "local_repo_path", "init_strategy"), "base"),
    **dict.fromkeys(("load_from_cache_file", "val_dataset_shuffle", "interleave_prob", "stopping_strategy",
                     "download_mode", "remove_unused_columns", "custom_dataset_info"), "data"),
    **dict.fromkeys(("max_pixels", "agent_template", "norm_bbox", "padding_side", "sequence_parallel_size",
                     "response_prefix", "template_backend", "template", "system", "max_length",
                     "truncation_strategy", "use_chat_template"), "template"),
}
# the section of a group's remaining flags
_SECTION_OF_GROUP = {"ModelArgs": "checkpoint", "ParallelArgs": "distributed", "DataArgs": "data",
                     "TrainArgs": "training", "RuntimeArgs": "model", "TunerArgs": "tuner", "MoEArgs": "moe",
                     "RLHFArgs": "dpo", "MegatronArgs": "training", "ArchArgs": "model", "SwiftArgs": "base",
                     "ExportArgs": "export"}
# Megatron-SWIFT's other spellings of a flag: alias -> name
ALIASES = {"moe_ffn_hidden_siz": "moe_ffn_hidden_size"}


def section_of(cls, name: str) -> str:
    if cls.__name__ == "ExportArgs":
        return "export"
    return _SECTION_OF.get(name) or _SECTION_OF_GROUP.get(cls.__name__, "training")


def str2bool(text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _base_type(tp):
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "[]"
    return "None" if value is None else str(value)


class _Parser(argparse.ArgumentParser):
    """One-line errors: `megatron <cmd>: error: <message>`, exit 2 (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    def __init__(self, prog):
        super().__init__(prog, max_help_position=40, width=110)

    def _format_usage(self, usage, actions, groups, prefix):   # no 200-flag usage line
        return f"usage: {self._prog} [--flag value ...]   (booleans: --flag true|false)\n\n"


_METAVAR = {int: "N", float: "X", str: "TEXT"}


def add_dataclass(groups: dict, cls, seen: dict) -> None:
    """Add one `--name` option per field of dataclass `cls`, under the field's section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in seen:
            raise RuntimeError(f"--{f.name} is declared by both {seen[f.name]} and {cls.__name__}")
        seen[f.name] = cls.__name__
        tp = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if "no_effect" in f.metadata:
            help_text += f" [no effect here: {f.metadata['no_effect']}]"
        if "refused" in f.metadata:
            help_text += f" [only the default: {f.metadata['refused']}]"
        help_text = f"{help_text} (default: {_shown_default(default_of(f))})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="true|false")
        elif get_origin(tp) in (list, tuple):
            item = get_args(tp)[0]
            kwargs.update(type=item, nargs="+", metavar=_METAVAR.get(item, "TEXT"))
        elif tp in (int, float, str):
            kwargs.update(type=tp, metavar=_METAVAR[tp])
        else:
            kwargs.update(type=str, metavar="TEXT")
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
        names = [f"--{f.name}"] + [f"--{a}" for a, n in ALIASES.items() if n == f.name] + \
            [f"--{a}" for a in f.metadata.get("aliases", ())]
        groups[section_of(cls, f.name)].add_argument(*names, **kwargs)


def build_parser(classes: tuple, prog: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, allow_abbrev=False, formatter_class=_HelpFormatter)
    groups = {s: parser.add_argument_group(f"{s} flags") for s in SECTIONS}
    seen: dict = {}
    for cls in classes:
        add_dataclass(groups, cls, seen)
    parser._action_groups = [g for g in parser._action_groups if g._group_actions]  # hide empty sections
    return parser


def _unknown(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts, after_unknown = [], False
    for word in unknown:
        if not word.startswith("-") or word.lstrip("-").replace(".", "", 1).isdigit():
            if not after_unknown:   # the values of an unknown flag are not news
                parts.append(f"unexpected value {word!r} (a flag takes its values right after it)")
            continue
        after_unknown = True
        flag = word.split("=", 1)[0]
        close = difflib.get_close_matches(flag.replace("-", "_").replace("__", "--", 1), known, n=3, cutoff=0.6)
        parts.append(f"unknown flag {flag}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
    return "; ".join(parts)


def parse(classes: tuple, argv: list[str], prog: str) -> tuple:
    """Parse `argv` into one instance per dataclass in `classes` (their __post_init__ checks run)."""
    parser = build_parser(classes, prog)
    argv = [_underscored(a) for a in argv]
    ns, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(_unknown(parser, unknown))
    ns = vars(ns)
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in ns.items() if k in names}
        inst = cls(**given)
        object.__setattr__(inst, "_explicit", frozenset(given))
        out.append(inst)
    return tuple(out)


def _underscored(word: str) -> str:
    """Megatron-LM spells flags with dashes (`--tensor-model-parallel-size`): accept both."""
    if word.startswith("--") and "-" in word[2:].split("=", 1)[0]:
        head, eq, tail = word[2:].partition("=")
        return "--" + head.replace("-", "_") + eq + tail
    return word


def explicit(args) -> frozenset:
    """The flags of the argument group `args` that the command line set (the rest are defaults)."""
    return getattr(args, "_explicit", frozenset())
