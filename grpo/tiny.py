"""A tiny Qwen2-shaped model and tokenizer, built locally, for tests and the offline demo.

No model can be downloaded here, so everything that needs "a model" (the trainer's tests, the
CPU demo run) uses this one: a byte-level BPE tokenizer trained on the given texts (by default
the built-in demo set, `data.demo`) and a randomly initialised `Qwen2ForCausalLM` a few hundred
thousand parameters large. Both mimic Qwen2.5-Instruct where the trainer can tell the
difference:

- ChatML turns `<|im_start|>{role}\\n{content}<|im_end|>\\n`; the generation prompt is
  `<|im_start|>assistant\\n`.
- eos = `<|im_end|>`, pad = `<|endoftext|>`, and the generation config lists both as EOS ids, so
  pad is one of the EOS ids (docs/PITFALLS.md #3: masks must come from the first EOS, not `!= pad`).
- The saved generation config carries Qwen2.5-Instruct's hidden sampling defaults (temperature
  0.7, top-p 0.8, top-k 20, repetition penalty 1.05) on purpose, so the trainer's tests can prove
  they do not leak into rollouts (docs/PITFALLS.md #2).
- Tied input/output embeddings, grouped-query attention (fewer KV heads than heads), no BOS.

Everything saved by `save_tiny_model` loads back with `AutoTokenizer.from_pretrained` and
`AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from grpo.io import atomic_path

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]  # ids 0, 1, 2 in this order

# Qwen2.5-Instruct's template without its tool-calling and default-system-prompt branches.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a `Qwen2Tokenizer`.

    The normaliser (NFC), pre-tokeniser (Qwen's split regex, then bytes) and decoder are the ones
    `Qwen2Tokenizer` rebuilds when it loads a checkpoint; `AutoTokenizer` picks that class for any
    qwen2 model, so training with the same pipeline is what makes a saved tokenizer encode exactly
    as the in-memory one. Byte-level means every string encodes (no unknown token). Training is
    deterministic: the same texts give the same vocabulary and merges. Padding is on the left, as
    generation from a batch of prompts needs.
    """
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    trained = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START],  # so the tag is never split into bytes
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


# The demo's model (`python train.py`): 0.7M parameters, the shape its hyperparameters were chosen with
# (README, "The demo run"). The test suite keeps build_model's smaller, faster defaults.
DEMO_MODEL = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=512)


def build_model(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2ForCausalLM sized for CPU tests, fp32.

    `vocab_size` defaults to `len(tokenizer)`; a larger value pads the embedding matrix (as real
    checkpoints do) with rows no token maps to. Initialisation depends only on `seed`: the global
    torch RNG is forked, so building a model does not change the caller's random stream.
    """
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    endoftext_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    assert vocab_size >= len(tokenizer), f"vocab_size {vocab_size} < tokenizer size {len(tokenizer)}"
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end_id,
        pad_token_id=endoftext_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = qwen_like_generation_config(im_end_id, endoftext_id)
    return model


def qwen_like_generation_config(im_end_id: int, endoftext_id: int) -> GenerationConfig:
    """Qwen2.5-Instruct's `generation_config.json`: the sampling defaults `generate` merges in
    silently unless the caller passes its own config. Kept here deliberately (see module doc)."""
    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        bos_token_id=None,
        eos_token_id=[im_end_id, endoftext_id],
        pad_token_id=endoftext_id,
    )


def save_tiny_model(path, texts: Iterable[str] | None = None, **model_kwargs) -> Path:
    """Build the tokenizer (on the demo texts when `texts` is None) and model; save both to `path`.

    `model_kwargs` go to `build_model` (sizes, seed, vocab_size). Returns `path` as a Path. The directory
    is written whole or not at all (grpo/io.py): a kill never leaves a config.json without its weights.
    Whatever was at `path` is replaced as a whole.
    """
    if texts is None:
        from data.demo import demo_texts  # the demo set is what the tiny model is trained on
        texts = demo_texts()
    path = Path(path)
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer, **model_kwargs)
    with atomic_path(path) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)  # also writes generation_config.json
    return path
