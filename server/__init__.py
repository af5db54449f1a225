"""vlserve: a self-hosted OpenAI-compatible vision inference server on llama.cpp."""

__version__ = "0.1.0"
