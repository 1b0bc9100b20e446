"""Data: files and the built-in demo set turned into chat prompts and ground truths.

    load_examples(source, split=None, skip_bad_rows=False) -> list[Example]   (data/loaders.py)
    build_prompts(tokenizer, examples, max_prompt_tokens) -> (prompt_ids, num_truncated)   (data/prompts.py)
"""
from data.formats import Example
from data.loaders import DownloadError, load_examples
from data.prompts import build_prompts

__all__ = ["DownloadError", "Example", "build_prompts", "load_examples"]
