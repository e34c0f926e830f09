"""megaswift's core attention for the non-TransformerEngine path.

``CoreAttention`` is a drop-in for megatron-core's local ``DotProductAttention`` as
``SelfAttentionSubmodules.core_attention``: same constructor and forward signatures, same
output layouts, but it also handles packed sequences (``PackedSeqParams`` with
``qkv_format='thd'``), GQA without materialising repeated keys when torch allows, and runs on CPU
(megatron's local version allocates its scores buffer and causal mask on CUDA).

The math lives in :mod:`megaswift.kernels.attention`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

from megaswift.kernels.attention import attention
from megaswift.runtime.context import current as current_runtime

__all__ = ["CoreAttention"]

_CAUSAL_MASK_TYPES = (
    AttnMaskType.causal,
    AttnMaskType.padding_causal,
    AttnMaskType.causal_bottom_right,
)


class CoreAttention(MegatronModule):
    """softmax(q k^T * scale) v over the heads of this tensor-parallel rank.

    Inputs (as megatron's ``Attention.forward`` passes them):

    * unpacked: query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]``;
      ``attention_mask`` bool ``[b, 1, sq, sk]`` (True = masked) or None. Returns ``[sq, b, np*hn]``.
    * packed (``packed_seq_params.qkv_format == 'thd'``): query ``[t, np, hn]``, key/value
      ``[t, ng, hn]``; sample boundaries from ``cu_seqlens_q_padded`` if set, else
      ``cu_seqlens_q``. Returns ``[t, np*hn]`` (``Attention`` reshapes it to ``[t, 1, np*hn]``).
      ``attention_mask`` is ignored here, as TransformerEngine does: the packing is the mask.

    Masking: causal for mask types causal / padding_causal / causal_bottom_right, combined (OR)
    with ``attention_mask`` when one is given. Fully-masked query rows give zeros.

    Context parallel (``pg_collection.cp`` of more than one rank): inputs hold this rank's
    load-balanced chunks (:func:`megaswift.context_parallel.slice_batch`); K/V are
    gathered over the group. Packed batches then use ``cu_seqlens_q_padded`` (each sample padded
    to a multiple of ``2 * cp``); ``attention_mask`` is ``[b, 1, local sq, global sk]``.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        **kwargs,  # newer megatron versions pass more (e.g. k_channels, v_channels)
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config

        if config.context_parallel_size > 1 and cp_comm_type not in (None, "all_gather", "p2p"):
            raise ValueError(
                f"cp_comm_type={cp_comm_type!r}: megaswift's core attention gathers K/V over the "
                "context-parallel group ('all_gather'); use TransformerEngine for a2a variants."
            )
        if is_layer_window_attention(
            getattr(config, "window_size", None), getattr(config, "window_attn_skip_freq", None), max(1, layer_number)
        ):
            raise ValueError(
                f"sliding-window attention (window_size={config.window_size}) is not supported by "
                "megaswift's core attention; use TransformerEngine."
            )
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type != "vanilla":
            raise ValueError(
                f"softmax_type={softmax_type!r} is not supported by megaswift's core attention "
                "(only 'vanilla')."
            )

        self.layer_number = max(1, layer_number)
        self.kernel = current_runtime().attention_kernel  # --attention_backend, resolved at start
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("CoreAttention: pg_collection must have a 'tp' process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        # context parallel: the same group megatron's attention hands RoPE
        self.cp_group = getattr(pg_collection, "cp", None)
        if config.context_parallel_size > 1 and (self.cp_group is None or self.cp_group.size() != config.context_parallel_size):
            raise ValueError(f"CoreAttention: context_parallel_size {config.context_parallel_size} "
                             "needs a 'cp' process group of that size in pg_collection")

        # Per attention head and per partition values (as DotProductAttention computes them).
        k_channels = kwargs.get("k_channels") or config.kv_channels
        v_channels = kwargs.get("v_channels") or config.kv_channels
        world_size = self.tp_group.size()
        self.hidden_size_per_attention_head = k_channels
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)
        self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels

        # apply_query_key_layer_scaling only guards fp16 overflow in megatron's scores; the
        # kernel computes scores and softmax in float32, so the net scale is all that matters.
        if softmax_scale is None:
            softmax_scale = getattr(config, "softmax_scale", None)
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(k_channels)
        self.softmax_scale = float(softmax_scale)

        self.attention_dropout_p = float(
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def _dropout_rng(self, query: Tensor, dropout_p: float):
        # Like DotProductAttention: without sequence parallel, each TP rank draws its dropout
        # from the model-parallel CUDA RNG stream. CPU dropout uses torch's default generator.
        if dropout_p > 0.0 and query.is_cuda and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """Attention over query/key/value; see the class docstring for layouts."""
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by megaswift's core attention.")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type in _CAUSAL_MASK_TYPES
        dropout_p = self.attention_dropout_p if self.training else 0.0

        qkv_format = None if packed_seq_params is None else packed_seq_params.qkv_format
        if qkv_format == "thd":
            p = packed_seq_params
            cu_q = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
            cu_kv = p.cu_seqlens_kv_padded if p.cu_seqlens_kv_padded is not None else p.cu_seqlens_kv
            if cu_q is None:
                raise ValueError("packed_seq_params (thd) needs cu_seqlens_q")
            if cu_kv is not None and cu_kv is not cu_q and not (
                cu_kv.shape == cu_q.shape and bool((cu_kv == cu_q).all())
            ):
                raise ValueError(
                    "megaswift's core attention supports packed self-attention only "
                    "(cu_seqlens_kv must equal cu_seqlens_q)"
                )
            if query.dim() == 4:  # [t, 1, h, d] if the caller did not squeeze the batch dim
                query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            with self._dropout_rng(query, dropout_p):
                return attention(
                    query,
                    key,
                    value,
                    cu_seqlens=cu_q,
                    causal=causal,
                    softmax_scale=self.softmax_scale,
                    dropout_p=dropout_p,
                    cp_group=self.cp_group,
                    kernel=self.kernel,
                )
        if qkv_format not in (None, "sbhd"):
            raise ValueError(
                f"packed_seq_params.qkv_format={qkv_format!r} is not supported "
                "(megaswift's core attention takes 'sbhd' or 'thd')"
            )
        with self._dropout_rng(query, dropout_p):
            return attention(
                query,
                key,
                value,
                attention_mask=attention_mask,
                causal=causal,
                softmax_scale=self.softmax_scale,
                dropout_p=dropout_p,
                cp_group=self.cp_group,
            )
