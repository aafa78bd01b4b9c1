"""Small models made locally (random weights, locally trained tokenizer) for demos, tests and benchmarks."""

from stratacache.models.local_llama import LlamaSpec, make_local_llama, sample_text

__all__ = ["LlamaSpec", "make_local_llama", "sample_text"]
