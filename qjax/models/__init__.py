"""Reference Flax models that qjax converts, and their loaders.

`qjax.models.llama` (LlamaConfig, LlamaForCausalLM), `qjax.models.text` (loss, perplexity, greedy
generation) and `qjax.models.gguf` (GGUF weights and tokenizer; needs the `example` extra, imported
only when used).
"""

from qjax.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM"]
