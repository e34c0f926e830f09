"""The rest of Megatron-SWIFT's flag surface: every flag its scripts pass parses here.

A flag is one of three kinds, declared in its field's metadata and listed in `docs/flags.md`:

* implemented (no marker): it does what Megatron-SWIFT documents;
* ``no_effect``: accepted and, when a user sets it to something other than its default, logged
  once with the reason (a dataloader worker count where batches are built in process, a
  multimodal switch on text-only models, a wandb project without wandb);
* ``refused``: it would change results and megaswift cannot honour it (yet): any value other than
  the default is an error naming what is missing, before any work is done.

Flags whose effect depends on the machine (kernel fusions, the precision-aware optimizer) are
resolved where the runtime is known (`runtime/context.py`) with the same rule: speed-only options
fall back with one logged line, result-changing ones are refused.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from megaswift.logging_utils import log

_TE_OPT = "CUDA + TransformerEngine (not yet run on a GPU)"
_NOT_CUDA_FUSED = "speed only; on by default where CUDA and the kernels are present (see the log line at start)"
_FUSED = "CUDA (TransformerEngine for rope/softmax/gradient accumulation); elsewhere the unfused ops, logged"


def _no_effect(why: str, help_text: str = "") -> dict:
    return {"help": help_text, "no_effect": why}


def _refused(why: str, help_text: str = "") -> dict:
    return {"help": help_text, "refused": why}


@dataclass(kw_only=True)
class MegatronArgs:
    """Megatron-LM / Megatron-SWIFT training, logging and checkpoint flags beyond the core groups."""
    # training
    deterministic_mode: bool = field(default=False, metadata={"help": "Deterministic algorithms (slower); megatron-core's deterministic_mode."})
    no_masked_softmax_fusion: bool = field(default=False, metadata={"help": "Disable the fused scale-mask-softmax kernel (" + _NOT_CUDA_FUSED + ").", "needs": _FUSED})
    no_bias_dropout_fusion: bool = field(default=False, metadata={"help": "Disable the fused bias-dropout-add (" + _NOT_CUDA_FUSED + ").", "needs": _FUSED})
    no_bias_swiglu_fusion: bool = field(default=False, metadata={"help": "Disable the fused bias-SwiGLU (" + _NOT_CUDA_FUSED + ").", "needs": _FUSED})
    no_rope_fusion: bool = field(default=False, metadata={"help": "Disable the fused RoPE kernel (" + _NOT_CUDA_FUSED + ").", "needs": _FUSED})
    no_gradient_accumulation_fusion: bool = field(default=False, metadata={"help": "Disable the fused weight-gradient accumulation (" + _NOT_CUDA_FUSED + ").", "needs": _FUSED})
    cross_entropy_loss_fusion: bool = field(default=False, metadata=_no_effect(
        "megaswift computes the vocab-parallel cross entropy in one place (the same numbers); the fused kernel is not wired",
        "Fused cross-entropy kernel."))
    cross_entropy_fusion_impl: str = field(default="native", metadata={**_no_effect(
        "see --cross_entropy_loss_fusion", "native|te"), "choices": ("native", "te")})
    use_precision_aware_optimizer: bool = field(default=False, metadata={"help": "TransformerEngine's precision-aware Adam (lower-precision master weights/states); refused elsewhere (it changes results).", "needs": _TE_OPT})
    main_grads_dtype: str = field(default="fp32", metadata={"help": "With --use_precision_aware_optimizer.", "needs": _TE_OPT, "choices": ("fp32", "bf16")})
    main_params_dtype: str = field(default="fp32", metadata={"help": "With --use_precision_aware_optimizer.", "needs": _TE_OPT, "choices": ("fp32", "fp16")})
    exp_avg_dtype: str = field(default="fp32", metadata={"help": "With --use_precision_aware_optimizer.", "needs": _TE_OPT, "choices": ("fp32", "fp16", "bf16", "fp8")})
    exp_avg_sq_dtype: str = field(default="fp32", metadata={"help": "With --use_precision_aware_optimizer.", "needs": _TE_OPT, "choices": ("fp32", "fp16", "bf16", "fp8")})
    dataloader_type: str = field(default="cyclic", metadata={**_no_effect(
        "megaswift's sampler visits the rows in a new seeded order every epoch (cyclic); streams are read in order (external)",
        "single|cyclic|external"), "choices": ("single", "cyclic", "external")})
    manual_gc: bool = field(default=False, metadata={"help": "Disable Python's automatic garbage collector; collect every --manual_gc_interval steps."})
    manual_gc_interval: int = field(default=0, metadata={"help": "Steps between manual collections (0: only at the end of training)."})
    num_workers: int = field(default=4, metadata=_no_effect(
        "batches are collated in the training process from pre-tokenised rows (no dataloader workers)",
        "Dataloader workers."))
    seq_length: Optional[int] = field(default=None, metadata=_no_effect(
        "sequence lengths come from the data (padding-free) and --max_length/--packing_length",
        "Megatron's sequence length (set from --max_length)."))
    use_cpu_initialization: bool = field(default=False, metadata=_no_effect(
        "weights always come from a checkpoint; nothing is initialised", "Initialise weights on the CPU."))
    extra_megatron_kwargs: Optional[str] = field(default=None, metadata={"help": "JSON object of further megatron-core TransformerConfig fields, e.g. '{\"attention_softmax_in_fp32\": false}'."})
    # checkpoint
    ckpt_format: str = field(default="torch_dist", metadata={**_refused(
        "megaswift saves and loads torch_dist checkpoints only", "torch|torch_dist|zarr"),
        "choices": ("torch", "torch_dist", "zarr")})
    no_initialization: bool = field(default=True, metadata=_no_effect(
        "weights always come from a checkpoint", "Skip weight initialisation."))
    auto_detect_ckpt_format: bool = field(default=True, metadata=_no_effect(
        "the format is read from the checkpoint's metadata.json (torch_dist only)", "Detect the checkpoint format."))
    exit_on_missing_checkpoint: bool = field(default=True, metadata=_no_effect(
        "a --load without a checkpoint is always an error (never a random initialisation)",
        "Exit when --load holds no checkpoint."))
    # distributed
    distributed_backend: str = field(default="nccl", metadata={"help": "nccl|gloo: nccl on GPUs, gloo on CPU (logged when nccl cannot serve).", "choices": ("nccl", "gloo")})
    tp_comm_overlap: bool = field(default=False, metadata=_no_effect(
        "TransformerEngine's userbuffer overlap of TP communication with GEMMs is not wired (speed only)",
        "Overlap tensor-parallel communication with GEMMs."))
    distributed_timeout_minutes: int = field(default=300000, metadata={"help": "torch.distributed timeout in minutes (Megatron-SWIFT: superseded by --ddp_timeout; the smaller of the two applies)."})
    # logging
    log_params_norm: bool = field(default=False, metadata=_no_effect(
        "the parameter norm is not computed (grad_norm is logged every step)", "Log the parameters' norm."))
    tensorboard_log_interval: int = field(default=1, metadata={"help": "Write tensorboard and logging.jsonl every N steps (the console line follows --log_interval)."})
    tensorboard_queue_size: int = field(default=50, metadata={"help": "Tensorboard events queued before a flush."})
    log_timers_to_tensorboard: bool = field(default=True, metadata={"help": "Log the step time (seconds) to tensorboard/logging.jsonl."})
    no_log_learning_rate_to_tensorboard: bool = field(default=False, metadata={"help": "Leave the learning rate out of tensorboard/logging.jsonl."})
    log_validation_ppl_to_tensorboard: bool = field(default=True, metadata={"help": "Log validation perplexity (exp of the validation loss) with it."})
    log_memory_to_tensorboard: bool = field(default=True, metadata=_no_effect(
        "memory is not logged per step (the benchmarks in bench/ measure it)", "Log memory use."))
    logging_level: Optional[int] = field(default=None, metadata={"help": "Python logging level of megaswift's log (e.g. 10 debug, 20 info, 30 warning)."})
    wandb_project: str = field(default="", metadata=_no_effect(
        "wandb is not a dependency; logs go to tensorboard and <save>/logging.jsonl", "wandb project."))
    wandb_exp_name: str = field(default="", metadata=_no_effect("see --wandb_project", "wandb experiment name."))
    wandb_save_dir: str = field(default="", metadata=_no_effect("see --wandb_project", "wandb directory."))
    # fp8
    fp8_format: Optional[str] = field(default=None, metadata={**_refused(
        "FP8 training is not implemented yet (it needs CUDA with TransformerEngine)", "e4m3|hybrid"),
        "choices": ("e4m3", "hybrid")})
    fp8_recipe: str = field(default="delayed", metadata={**_refused("see --fp8_format", "tensorwise|delayed|mxfp8|blockwise"),
                                                          "choices": ("tensorwise", "delayed", "mxfp8", "blockwise")})
    fp8_amax_history_len: int = field(default=1024, metadata=_refused("see --fp8_format", "FP8 amax history length."))
    fp8_amax_compute_algo: str = field(default="max", metadata={**_refused("see --fp8_format", "most_recent|max"),
                                                                "choices": ("most_recent", "max")})
    fp8_param_gather: bool = field(default=False, metadata=_refused("see --fp8_format", "Keep parameters in FP8."))
    # mixed precision
    apply_query_key_layer_scaling: Optional[bool] = field(default=None, metadata=_no_effect(
        "the attention softmax runs in float32 (--attention_softmax_in_fp32), where the scaling changes nothing",
        "Scale Q*K^T by 1/layer number (fp16 trick)."))
    attention_softmax_in_fp32: bool = field(default=True, metadata={"help": "Compute the attention mask and softmax in float32."})
    # train (Megatron-SWIFT's own)
    mlp_padding_free: bool = field(default=False, metadata=_no_effect(
        "batches are padding-free end to end (--padding_free true, the default)", "Padding-free MLP with --padding_free false."))
    vit_gradient_checkpointing: bool = field(default=True, metadata=_no_effect("multimodal models only", "Recompute the vision tower."))
    gradient_checkpointing_kwargs: Optional[str] = field(default=None, metadata=_no_effect(
        "activation recompute is megatron-core's (--recompute_granularity/--recompute_modules)", "torch.utils.checkpoint kwargs (JSON)."))
    enable_dft_loss: bool = field(default=False, metadata=_refused("DFT loss is not implemented yet", "Dynamic Fine-Tuning loss."))
    enable_channel_loss: bool = field(default=False, metadata=_refused("per-channel loss is not implemented yet", "Loss per row 'channel'."))
    # tuner (multimodal)
    freeze_llm: bool = field(default=False, metadata=_no_effect("multimodal models only", "Freeze the language model."))
    freeze_vit: bool = field(default=True, metadata=_no_effect("multimodal models only", "Freeze the vision tower."))
    freeze_aligner: bool = field(default=True, metadata=_no_effect("multimodal models only", "Freeze the aligner."))

    def __post_init__(self) -> None:
        if self.extra_megatron_kwargs is not None:
            self.extra_config()   # invalid JSON is a parse error, before any work
        if self.manual_gc_interval < 0:
            raise ValueError(f"--manual_gc_interval must be >= 0, got {self.manual_gc_interval}")
        if self.tensorboard_log_interval < 1:
            raise ValueError(f"--tensorboard_log_interval must be >= 1, got {self.tensorboard_log_interval}")
        if self.distributed_timeout_minutes < 1:
            raise ValueError(f"--distributed_timeout_minutes must be >= 1, got {self.distributed_timeout_minutes}")

    def extra_config(self) -> dict:
        """--extra_megatron_kwargs as a dict of TransformerConfig fields (unknown names refused)."""
        if not self.extra_megatron_kwargs:
            return {}
        try:
            extra = json.loads(self.extra_megatron_kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"--extra_megatron_kwargs {self.extra_megatron_kwargs!r} is not valid JSON ({e.msg}); "
                             """write it like '{"attention_softmax_in_fp32": false}'""") from None
        if not isinstance(extra, dict):
            raise ValueError(f"--extra_megatron_kwargs must be a JSON object, got {self.extra_megatron_kwargs!r}")
        from megatron.core.transformer import TransformerConfig

        known = {f.name for f in dataclasses.fields(TransformerConfig)}
        unknown = sorted(set(extra) - known)
        if unknown:
            import difflib

            hints = {k: difflib.get_close_matches(k, known, 1) for k in unknown}
            shown = ", ".join(f"{k}" + (f" (did you mean {h[0]}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"--extra_megatron_kwargs: {shown} not a megatron-core TransformerConfig field")
        return extra


@dataclass(kw_only=True)
class ArchArgs:
    """The model section: read from config.json; a flag that contradicts the checkpoint is an error."""
    num_layers: Optional[int] = field(default=None, metadata={"help": "Transformer layers (config.json num_hidden_layers)."})
    hidden_size: Optional[int] = field(default=None, metadata={"help": "Hidden size (config.json)."})
    ffn_hidden_size: Optional[int] = field(default=None, metadata={"help": "FFN hidden size (config.json intermediate_size)."})
    num_attention_heads: Optional[int] = field(default=None, metadata={"help": "Attention heads (config.json)."})
    group_query_attention: Optional[bool] = field(default=None, metadata={"help": "Grouped-query attention (num_key_value_heads < num_attention_heads)."})
    num_query_groups: Optional[int] = field(default=None, metadata={"help": "Key/value heads (config.json num_key_value_heads)."})
    max_position_embeddings: Optional[int] = field(default=None, metadata={"help": "Longest position (config.json); the default --max_length."})
    position_embedding_type: Optional[str] = field(default=None, metadata={"help": "rope for every family megaswift converts.", "choices": ("learned_absolute", "rope", "mrope", "relative", "none")})
    rotary_base: Optional[float] = field(default=None, metadata={"help": "RoPE base (config.json rope_theta)."})
    rotary_percent: Optional[float] = field(default=None, metadata={"help": "Fraction of each head rotated (config.json partial_rotary_factor, else 1)."})
    normalization: Optional[str] = field(default=None, metadata={"help": "RMSNorm for every family megaswift converts.", "choices": ("LayerNorm", "RMSNorm")})
    norm_epsilon: Optional[float] = field(default=None, metadata={"help": "Norm epsilon (config.json rms_norm_eps)."})
    swiglu: Optional[bool] = field(default=None, metadata={"help": "SwiGLU MLP (config.json hidden_act silu)."})
    untie_embeddings_and_output_weights: Optional[bool] = field(default=None, metadata={"help": "Separate output layer (config.json tie_word_embeddings false)."})
    disable_bias_linear: Optional[bool] = field(default=None, metadata={"help": "No biases in linears (the family's)."})
    add_qkv_bias: Optional[bool] = field(default=None, metadata={"help": "Biases on Q, K, V only (Qwen2's)."})
    kv_channels: Optional[int] = field(default=None, metadata={"help": "Head dimension (config.json head_dim, else hidden_size/heads)."})
    qk_layernorm: Optional[bool] = field(default=None, metadata={"help": "Norms on Q and K (Qwen3's)."})
    padded_vocab_size: Optional[int] = field(default=None, metadata={"help": "Vocabulary rows after padding (config.json vocab_size rounded up to --make_vocab_size_divisible_by x TP)."})
    rope_scaling: Optional[str] = field(default=None, metadata={"help": "JSON of config.json's rope_scaling."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Dropout on attention probabilities while training."})
    hidden_dropout: float = field(default=0.0, metadata={"help": "Dropout after attention and MLP while training."})

    def __post_init__(self) -> None:
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name} {getattr(self, name)} must be in [0, 1)")
        if self.rope_scaling is not None:
            try:
                json.loads(self.rope_scaling)
            except json.JSONDecodeError as e:
                raise ValueError(f"--rope_scaling {self.rope_scaling!r} is not valid JSON ({e.msg}); pass it like "
                                 """'{"rope_type": "llama3", "factor": 8.0, ...}' as in config.json""") from None


@dataclass(kw_only=True)
class SwiftArgs:
    """ms-swift's base, model, data and template flags that Megatron-SWIFT inherits and megaswift has no use for."""
    tuner_backend: str = field(default="peft", metadata={**_no_effect("LoRA is grafted onto megatron's modules (exported in PEFT's format)", "peft|unsloth"), "choices": ("peft", "unsloth")})
    adapters: list[str] = field(default_factory=list, metadata=_refused(
        "training starts from a LoRA run with --adapter_load <run>; a PEFT folder imports with `megatron export --adapters <dir> --to_mcore true`",
        "PEFT adapters to start from."))
    external_plugins: list[str] = field(default_factory=list, metadata=_refused("megaswift loads no plugin code", "Plugin .py files."))
    custom_register_path: list[str] = field(default_factory=list, metadata=_refused("megaswift loads no registration code; pass local model/data paths", "Registration .py files."))
    model_kwargs: Optional[str] = field(default=None, metadata=_no_effect("multimodal/model-specific kwargs; none apply to text models here", "JSON model kwargs."))
    load_args: bool = field(default=False, metadata=_no_effect("a checkpoint's args.json is always read for its model, never for training flags", "Read flags from args.json."))
    load_data_args: bool = field(default=False, metadata=_no_effect("data flags come from the command line", "Read data flags from args.json."))
    use_hf: bool = field(default=False, metadata=_no_effect("no hub is reached from here: pass --model <local dir> and local --dataset files", "Download from Hugging Face instead of ModelScope."))
    hub_token: Optional[str] = field(default=None, metadata=_no_effect("see --use_hf", "Hub token."))
    ddp_timeout: int = field(default=18000000, metadata={"help": "torch.distributed timeout in seconds (ms-swift's; with --distributed_timeout_minutes the smaller applies)."})
    ddp_backend: Optional[str] = field(default=None, metadata={"help": "nccl|gloo|...: overrides --distributed_backend (default: nccl on GPUs, gloo on CPU)."})
    ignore_args_error: bool = field(default=False, metadata=_no_effect("notebook convenience; errors are always reported", "Ignore argument errors."))
    # model
    model_type: Optional[str] = field(default=None, metadata=_no_effect("the family is read from config.json's architectures", "ms-swift model type."))
    model_revision: Optional[str] = field(default=None, metadata=_no_effect("models are local directories", "Hub revision."))
    task_type: str = field(default="causal_lm", metadata={**_refused("megaswift trains causal language models only", "causal_lm|seq_cls|embedding"),
                                                          "choices": ("causal_lm", "seq_cls", "embedding")})
    num_labels: Optional[int] = field(default=None, metadata=_refused("see --task_type", "Classification labels."))
    problem_type: Optional[str] = field(default=None, metadata=_refused("see --task_type", "Classification problem type."))
    attn_impl: Optional[str] = field(default=None, metadata=_no_effect("megatron's attention runs; choose its kernel with --attention_backend", "flash_attn|sdpa|eager (transformers)."))
    device_map: Optional[str] = field(default=None, metadata=_no_effect("placement is megatron's parallel layout", "transformers device_map."))
    max_memory: Optional[str] = field(default=None, metadata=_no_effect("see --device_map", "transformers max_memory."))
    local_repo_path: Optional[str] = field(default=None, metadata=_no_effect("no model code is cloned", "Local GitHub repo."))
    init_strategy: Optional[str] = field(default=None, metadata=_no_effect("every weight comes from the checkpoint", "Initialise missing weights."))
    # data
    load_from_cache_file: bool = field(default=True, metadata=_no_effect("tokenisation is not cached between runs (use --cached_dataset)", "datasets' cache."))
    val_dataset_shuffle: bool = field(default=False, metadata=_no_effect("validation rows are read in order", "Shuffle --val_dataset."))
    interleave_prob: Optional[list[float]] = field(default=None, metadata=_refused("datasets are concatenated; interleaving is not implemented yet", "interleave_datasets probabilities."))
    stopping_strategy: str = field(default="first_exhausted", metadata={**_no_effect("see --interleave_prob", "first_exhausted|all_exhausted"),
                                                                       "choices": ("first_exhausted", "all_exhausted")})
    download_mode: str = field(default="reuse_dataset_if_exists", metadata={**_no_effect("no hub datasets are downloaded", "reuse_dataset_if_exists|force_redownload"),
                                                                          "choices": ("reuse_dataset_if_exists", "force_redownload")})
    remove_unused_columns: bool = field(default=True, metadata=_no_effect("rows are reduced to the columns the template reads", "Drop unused columns."))
    custom_dataset_info: list[str] = field(default_factory=list, metadata=_refused("dataset registration files are not read; pass files with --dataset (and --columns)", "Dataset registry JSON."))
    # template
    max_pixels: Optional[int] = field(default=None, metadata=_no_effect("multimodal models only", "Largest image."))
    agent_template: Optional[str] = field(default=None, metadata=_no_effect("tool calls are rendered by the chat template's own tools support", "Agent template."))
    norm_bbox: Optional[str] = field(default=None, metadata=_no_effect("multimodal models only", "Bounding-box scaling."))
    padding_side: str = field(default="right", metadata={**_no_effect("batches are padding-free", "left|right"), "choices": ("left", "right")})
    sequence_parallel_size: int = field(default=1, metadata=_refused("Megatron splits sequences with --context_parallel_size N (and --sequence_parallel true under TP)", "ms-swift's Ulysses sequence parallelism."))
    response_prefix: Optional[str] = field(default=None, metadata=_refused("a response prefix is not implemented yet", "Text before every response."))
    template_backend: str = field(default="swift", metadata={**_no_effect("chat templates render through the tokenizer's own template or megaswift's built-ins", "swift|jinja"),
                                                            "choices": ("swift", "jinja")})


def check_flags(groups, explicit_of) -> None:
    """Refused flags set to anything but their default are errors; no-effect ones given on the command
    line are logged once (whatever their value: the user asked for something that does not happen here)."""
    notes = []
    for args in groups:
        given = explicit_of(args)
        for f in dataclasses.fields(args):
            if f.name not in given:
                continue
            value, default = getattr(args, f.name), (f.default_factory() if f.default_factory is not dataclasses.MISSING
                                                     else f.default)
            if "refused" in f.metadata and value != default:
                raise ValueError(f"--{f.name} {_show(value)}: {f.metadata['refused']}")
            if "no_effect" in f.metadata:  # given, even at its default (e.g. --num_workers 4): said once
                notes.append(f"--{f.name} {_show(value)} has no effect here: {f.metadata['no_effect']}")
    for note in notes:
        log(note)


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
