"""Mixtral: every layer an MoE block (`block_sparse_moe`, experts `w1`/`w3`/`w2`), the router's
top-k probabilities renormalised; its sliding window is refused like Mistral's where sequences
could exceed it (`model.config.check_sliding_window`)."""

from megaswift.converters.family import Family, MoENames, moe_fields, moe_mlp


def _mixtral_config(cfg) -> dict:
    return moe_fields(cfg, num_experts=cfg.num_local_experts, topk=cfg.num_experts_per_tok,
                      ffn=cfg.intermediate_size, moe_layers=[1] * cfg.num_hidden_layers, pre_softmax=False)


MIXTRAL = Family(name="mixtral", model_types=("mixtral",), architecture="MixtralForCausalLM",
                 mlp=moe_mlp(MoENames(block="block_sparse_moe", expert=("w1", "w3", "w2"))),
                 transformer_config=_mixtral_config)
