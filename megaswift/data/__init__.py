"""Everything between data files and the batches megatron-core consumes."""
