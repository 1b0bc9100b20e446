"""Rollout: sample G completions per prompt with HF `generate`, and mark which tokens are the completion.

Three traps that silently broke other GRPO implementations are handled here (docs/PITFALLS.md #1-3):
- generating with gradient checkpointing on drops the KV cache in train() mode, and `generate` then
  produces garbage with no error: `generation_mode` switches to eval(), checkpointing off, cache on,
  and restores the model afterwards;
- `generate` merges the model's own generation_config.json (Qwen2.5-Instruct: temperature 0.7,
  top-p 0.8, top-k 20, repetition penalty 1.05) into whatever is passed: `sampling_config` sets every
  knob, and the model's config is swapped out for ours while generating;
- when pad == EOS, masks built from `ids != pad` drop the final EOS (the model never learns to stop):
  `completion_mask` runs from the first generated token through the first EOS of any EOS id.

Notation: B prompts, G completions per prompt, N = B * G sequences (prompt-major), P prompt tokens
(left-padded), T completion tokens (right-padded).
"""
import copy
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CompileConfig, DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from grpo.logprobs import position_ids_from_mask
from grpo.model import is_checkpointing, set_checkpointing


@dataclass
class Rollout:
    """A batch of sampled sequences. Data contract: row i is completion i % G of prompt i // G."""
    input_ids: torch.Tensor        # (N, P + T) long: [left-padded prompt | completion, right-padded]
    attention_mask: torch.Tensor   # (N, P + T) long: 1 on real prompt tokens and on completion tokens through EOS
    completion_mask: torch.Tensor  # (N, T) bool: first generated token through the first EOS, inclusive
    truncated: torch.Tensor        # (N,) bool: no EOS within max_new_tokens

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, -self.completion_mask.shape[1]:]           # (N, T)

    def select(self, rows: slice | torch.Tensor) -> "Rollout":
        """Rows `rows`, minus the columns that are padding in all of them (left of the longest prompt,
        right of the longest completion): a micro-batch pays only for its own lengths.
        Completion column t stays column t, so (N, T) tensors align after `[rows, :T']`."""
        T = self.completion_mask.shape[1]
        attn, comp = self.attention_mask[rows], self.completion_mask[rows]
        prompt_real = attn[:, :-T].any(dim=0).nonzero()
        first = int(prompt_real.min()) if len(prompt_real) else attn.shape[1] - T - 1
        comp_real = comp.any(dim=0).nonzero()
        t = int(comp_real.max()) + 1 if len(comp_real) else 1
        end = attn.shape[1] - T + t
        return Rollout(self.input_ids[rows, first:end], attn[:, first:end], comp[:, :t], self.truncated[rows])


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask from the first generated token through the first EOS (any of eos_ids), never from pad ids.

    completion_ids: (N, T).  Returns mask (N, T) bool and truncated (N,) bool (no EOS: every token kept).
    """
    T = completion_ids.shape[1]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))   # (N, T)
    truncated = ~is_eos.any(dim=1)                                                                # (N,)
    first_eos = torch.where(truncated, T, is_eos.int().argmax(dim=1))                           # (N,)
    mask = torch.arange(T, device=completion_ids.device)[None, :] <= first_eos[:, None]         # (N, T)
    return mask, truncated


def sampling_config(temperature: float, max_new_tokens: int, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Every sampling knob set explicitly; temperature 0 means greedy (which must leave top_k unset: transformers
    warns that a greedy config's top_k is "not valid")."""
    return GenerationConfig(
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
        top_p=1.0, top_k=0 if temperature > 0 else None, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens, min_new_tokens=0, eos_token_id=list(eos_ids), pad_token_id=pad_id,
        use_cache=True, num_beams=1)


@contextmanager
def generation_mode(model, config: GenerationConfig):
    """eval(), gradient checkpointing off, our generation config in place; all restored on exit."""
    was_training, had_checkpointing = model.training, is_checkpointing(model)
    saved_config = model.generation_config
    model.eval()
    if had_checkpointing:
        set_checkpointing(model, False)
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved_config
        if had_checkpointing:
            set_checkpointing(model, True)
        model.train(was_training)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(sequences), max_len), padded on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def _right_pad(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


# Tokens per `generate` call before finished rows are dropped: a call costs a few milliseconds of set-up, a
# finished row kept alive costs a full decode step per token, so a short segment wastes little of either.
SEGMENT_TOKENS = 32


class _ReservedLayer(DynamicLayer):
    """A layer of the KV cache that appends into room reserved for a whole segment.

    HF's DynamicLayer appends with torch.cat, which copies the layer's entire cache on every decode step: a read
    and a write of all of it, twice what attention itself reads (on a CPU, a fresh allocation as well). Here a
    step writes its one token; `reserve(n)` copies the cache once per segment into a buffer with room for n more.
    `keys` / `values` are views of the filled part, so attention sees exactly what DynamicLayer would give it.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._keys = self._values = None        # (n, kv_heads, capacity, head_dim) once reserved

    def reserve(self, tokens: int) -> None:
        length = self.get_seq_length()
        if length == 0 or (self._keys is not None and self._keys.shape[2] >= length + tokens):
            return
        n, heads, _, dim = self.keys.shape
        self._keys = self.keys.new_empty(n, heads, length + tokens, dim)
        self._values = self.values.new_empty(n, heads, length + tokens, dim)
        self._keys[:, :, :length], self._values[:, :, :length] = self.keys, self.values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[2]
        if self._keys is None or self._keys.shape[2] < end:                  # no room reserved: concatenate
            self._keys = self._values = None
            return super().update(key_states, value_states)
        self._keys[:, :, start:end], self._values[:, :, start:end] = key_states, value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._keys = self._values = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._keys = self._values = None


def _new_cache(model) -> DynamicCache:
    """The model's DynamicCache with each plain full-attention layer swapped for a _ReservedLayer."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_ReservedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _prefill_shared(model, ids: torch.Tensor, mask: torch.Tensor, repeats: int) -> DynamicCache:
    """KV cache of every prompt token but the last, computed once per prompt and repeated for its G rows.

    ids, mask: (b, P). Returns a cache for (b*G, P-1) tokens, prompt-major. The last prompt token is left for
    `generate`, whose first forward needs at least one new token to produce the first completion logits.
    Positions skip left padding exactly as `generate` computes them, so the cache equals what `generate`
    would have built for each of the G copies itself (G times the work).
    """
    cache = _new_cache(model)
    if ids.shape[1] > 1:
        model.base_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                         position_ids=position_ids_from_mask(mask[:, :-1]), cache=cache, use_cache=True)
        cache.batch_repeat_interleave(repeats)                               # (b, ...) -> (b*G, ...)
    return cache


class NonFiniteLogits(RuntimeError):
    """The model produced NaN or inf logits while sampling: its weights are no longer usable."""


class FiniteGuard(LogitsProcessor):
    """Sampling from NaN/inf logits crashes (a device-side assert on CUDA, which ends the process): the guard
    replaces them by 0 so that generation can finish, and remembers that it did, on the device (no host sync
    per token). generate_rollout checks once at the end and raises NonFiniteLogits."""

    def __init__(self):
        self.seen = None                               # a 0-dim bool tensor once a non-finite logit was seen

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(scores)                                  # (b, V)
        bad = ~finite.all()
        self.seen = bad if self.seen is None else self.seen | bad
        return scores.where(finite, 0.0)


def _sample_group(model, ids: torch.Tensor, mask: torch.Tensor, G: int, config: GenerationConfig,
                  pad_id: int, guard: LogitsProcessorList) -> torch.Tensor:
    """G completions for each of b prompts: (b, P) -> (b*G, t) completion ids, right-padded with pad_id.

    Two savings over one `generate(num_return_sequences=G)` call, which computes each prompt G times and keeps
    decoding rows that already ended until the longest one does (docs/PITFALLS.md #11):
    - the prompt is prefilled once and its cache shared by its G rows (`_prefill_shared`);
    - generation runs in segments of SEGMENT_TOKENS; after each, rows that produced an EOS leave the batch
      and the cache, so later steps pay only for the rows still going.
    Sampling is unchanged: each segment is a `generate` call with the same explicit config.
    """
    max_new = config.max_new_tokens
    cache = _prefill_shared(model, ids, mask, G)
    seq, seq_mask = ids.repeat_interleave(G, dim=0), mask.repeat_interleave(G, dim=0)      # (b*G, P)
    out = torch.full((len(seq), max_new), pad_id, dtype=torch.long, device=ids.device)     # (b*G, max_new)
    alive = torch.arange(len(seq), device=ids.device)                # rows of `out` still generating
    eos = torch.tensor(config.eos_token_id, device=ids.device)
    done = 0
    while done < max_new and len(alive):
        segment = copy.copy(config)
        segment.max_new_tokens = min(SEGMENT_TOKENS, max_new - done)
        for layer in cache.layers:
            if isinstance(layer, _ReservedLayer):
                layer.reserve(segment.max_new_tokens)                   # each decode step adds one token
        full = model.generate(input_ids=seq, attention_mask=seq_mask, cache=cache, generation_config=segment,
                              logits_processor=guard)
        new = full[:, seq.shape[1]:]                                 # (alive, s): s < segment if all ended
        out[alive, done:done + new.shape[1]] = new
        done += new.shape[1]
        going = ~torch.isin(new, eos).any(dim=1)                     # (alive,): no EOS yet
        seq = full
        seq_mask = torch.cat([seq_mask, torch.ones_like(new)], dim=1)  # going rows: every new token is real
        if not going.all():
            keep = going.nonzero().squeeze(1)
            seq, seq_mask, alive = seq[keep], seq_mask[keep], alive[keep]
            cache.batch_select_indices(keep)
    return out[:, :done]


def static_cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """--compile_generation's KV-cache length: prompt + completion rounded up to a power of two, so that batches
    of nearby prompt lengths share one compiled graph."""
    return 1 << (prompt_length + max_new_tokens - 1).bit_length()


def _sample_compiled(model, ids: torch.Tensor, mask: torch.Tensor, G: int, config: GenerationConfig,
                     pad_id: int, guard: LogitsProcessorList) -> torch.Tensor:
    """G completions for each of b prompts from one `generate` call on a static KV cache, whose decode step
    torch.compile turns into one fused graph (CUDA graphs on GPU): (b, P) -> (b*G, t) completion ids.

    Static shapes are the price: every prompt is prefilled G times (its row repeated) and finished rows
    keep decoding until the last one ends. The cache length is rounded up to a power of two, and HF keeps the
    longest cache it has made, so a run compiles for a few lengths (and the last, smaller batch) and then reuses them.
    pad_id is unused (generate pads finished rows itself); the signature is _sample_group's.
    """
    static = copy.copy(config)
    static.cache_implementation = "static"
    static.max_cache_len = static_cache_length(ids.shape[1], config.max_new_tokens)
    static.compile_config = CompileConfig(dynamic=False)
    static.compile_config._compile_all_devices = True       # HF compiles only on accelerators unless told
    full = model.generate(input_ids=ids.repeat_interleave(G, dim=0), attention_mask=mask.repeat_interleave(G, dim=0),
                          generation_config=static, logits_processor=guard)  # (b*G, P + t)
    return full[:, ids.shape[1]:]


@torch.no_grad()
def generate_rollout(model, prompts: list[list[int]], *, num_generations: int, max_new_tokens: int,
                     temperature: float, eos_ids: list[int], pad_id: int, batch_size: int,
                     compile: bool = False) -> Rollout:
    """Sample `num_generations` completions for each prompt (token ids), `batch_size` sequences per
    batch (`_sample_group`, or `_sample_compiled` with `compile`). On CUDA out-of-memory the batch is
    halved and retried. NaN or inf logits raise NonFiniteLogits (after generation: see FiniteGuard)."""
    G, device = num_generations, next(model.parameters()).device
    sample = _sample_compiled if compile else _sample_group
    config = sampling_config(temperature, max_new_tokens, eos_ids, pad_id)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                      # (B, P)
    prompts_per_call = max(1, batch_size // G)
    outputs, start, guard = [], 0, FiniteGuard()
    with generation_mode(model, config):
        while start < len(prompts):
            ids = prompt_ids[start:start + prompts_per_call].to(device)
            mask = prompt_mask[start:start + prompts_per_call].to(device)
            try:
                out = sample(model, ids, mask, G, config, pad_id, LogitsProcessorList([guard]))  # (b*G, t)
            except torch.OutOfMemoryError:
                if prompts_per_call == 1:
                    raise
                prompts_per_call //= 2
                torch.cuda.empty_cache()
                print(f"out of memory in generation: retrying with {prompts_per_call * G} sequences per call")
                continue
            outputs.append(out)
            start += prompts_per_call
    if guard.seen is not None and guard.seen.item():
        raise NonFiniteLogits("the model produced NaN or inf logits while sampling")
    T = max(o.shape[1] for o in outputs)
    completion_ids = torch.cat([_right_pad(o, T, pad_id) for o in outputs])  # (N, T)
    comp_mask, truncated = completion_mask(completion_ids, eos_ids)          # (N, T), (N,)
    input_ids = torch.cat([prompt_ids.to(device).repeat_interleave(G, dim=0), completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.to(device).repeat_interleave(G, dim=0), comp_mask.long()], dim=1)
    return Rollout(input_ids, attention_mask, comp_mask, truncated)


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """Completion text of each row, special tokens (EOS) removed, nothing after the first EOS."""
    ids = rollout.completion_ids.tolist()
    lengths = rollout.completion_mask.sum(dim=1).tolist()
    return tokenizer.batch_decode([row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True)


def generate_text(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                  temperature: float = 0.0) -> list[str]:
    """One completion per prompt (greedy when temperature is 0), decoded without special tokens."""
    rollout = generate_rollout(model, prompts, num_generations=1, max_new_tokens=max_new_tokens,
                               temperature=temperature, eos_ids=eos_token_ids(model, tokenizer),
                               pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    return decode_completions(tokenizer, rollout)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a turn: the model's generation config (Qwen2.5: <|im_end|> and <|endoftext|>),
    its config, and the tokenizer's EOS."""
    ids = []
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        ids += source if isinstance(source, list) else [source]
    return sorted({i for i in ids if i is not None})


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
