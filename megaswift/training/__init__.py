"""The training loop on megatron-core: schedules, DDP, distributed optimizer, dist_checkpointing."""
