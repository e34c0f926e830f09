"""Llama (incl. SmolLM2 with tied embeddings) and Mistral: the plain dense decoder."""

from megaswift.converters.family import Family

LLAMA = Family(name="llama", model_types=("llama",), architecture="LlamaForCausalLM")
MISTRAL = Family(name="mistral", model_types=("mistral",), architecture="MistralForCausalLM")
