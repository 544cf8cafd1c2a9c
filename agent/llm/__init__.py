"""LLM backends: the embedded llama.cpp model, OpenAI-compatible endpoints by name, pictures for vision models."""
