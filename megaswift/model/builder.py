"""Build this rank's part of a megatron-core GPTModel for an HF model family."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from megaswift.model.rope import install_rope
from megaswift.model.spec import block_spec
from megaswift.runtime.context import current as current_runtime


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rows after padding to a multiple of lcm(`divisible_by`, TP).

    The result is recorded with the checkpoint and reused when it is loaded at another layout
    (the default 128 keeps it loadable at every power-of-two TP).
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def build_gpt_model(hf_config, config, *, padded_vocab: int, vp_stage: int | None = None,
                    parallel_output: bool = True) -> GPTModel:
    """This rank's GPTModel chunk (pre/post process from the pipeline position), on the compute device."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, layers, vp_stage),
        vocab_size=padded_vocab,
        max_sequence_length=getattr(hf_config, "max_position_embeddings", 4096),
        pre_process=pre,
        post_process=post,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(1e4),
        vp_stage=vp_stage,
    )
    install_rope(model, hf_config, config)
    mark_tensor_parallel_weights(model)
    if current_runtime().cuda:
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> int:
    """Tag every TP-sharded weight `tensor_model_parallel` (with its partition dim); returns how many.

    megatron-core 0.16 sets these attributes only inside its weight initialisers, which
    `perform_initialization=False` skips (our weights always come from a checkpoint). Untagged,
    a shard counts as a TP duplicate: the gradient norm sums only TP rank 0's shards, so every
    TP run logged a smaller norm and clipped by the wrong factor (TP=2: 1.54 against 1.85).
    Biases of column-parallel linears are tagged by megatron itself.
    """
    tagged = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)
            tagged += 1
    return tagged
