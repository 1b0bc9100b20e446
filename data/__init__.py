"""Data: files and the built-in demo set turned into chat prompts and ground truths."""
