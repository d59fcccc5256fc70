"""Hugging Face checkpoints: sources (safetensors, GGUF), per-family name tables, load and save."""
