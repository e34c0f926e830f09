"""Model building blocks on megatron-core: attention, layers, norms, rotary embeddings."""
