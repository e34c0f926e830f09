"""megaswift: train Hugging Face LLMs on Megatron-Core, from one CPU to many GPU nodes."""

__version__ = "0.1.0"
