"""Reference Flax models that qjax converts (see qjax.models.llama)."""
