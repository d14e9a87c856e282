"""solarjax: SOLAR-style depth up-scaling of Llama/Mistral decoders in JAX."""

__version__ = "0.1.0"
