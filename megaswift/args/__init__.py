"""Typed argument groups, one file per concern, flags in Megatron-SWIFT / Megatron-LM spelling."""
