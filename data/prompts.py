"""`build_prompts`: examples -> prompt token ids through the model's chat template.

Follows ToolRL's verl pipeline: the prompt is `[system, user]` rendered with the tokenizer's
chat template and `add_generation_prompt=True`, and a prompt longer than the limit is cut from
the left, so that what survives is the end: the user turn and the assistant header the model
continues from.
"""
from __future__ import annotations

from data.formats import Example


def build_prompts(tokenizer, examples: list[Example], max_prompt_tokens: int) -> tuple[list[list[int]], int]:
    """Returns `(prompt_ids, num_truncated)`.

    prompt_ids:    one list of token ids per example, in order, each at most `max_prompt_tokens`
                   long and unpadded (the trainer pads on the left when it batches)
    num_truncated: how many prompts lost tokens from their start
    """
    assert max_prompt_tokens > 0, f"max_prompt_tokens must be positive, got {max_prompt_tokens}"
    texts = [tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
             for example in examples]
    # the template already wrote any BOS it wants; adding special tokens again would double it. One batched call:
    # the fast tokenizer encodes a list on all cores
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    num_truncated = sum(len(ids) > max_prompt_tokens for ids in prompt_ids)
    return [ids[-max_prompt_tokens:] for ids in prompt_ids], num_truncated
