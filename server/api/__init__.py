"""HTTP layer: OpenAI-shaped routes. Knows nothing of llama.cpp."""
