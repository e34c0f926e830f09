"""Process groups, devices and the megatron-core adaptations for CPU."""
