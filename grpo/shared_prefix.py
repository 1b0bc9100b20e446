"""Completion log-probs with each prompt computed once per group, not once per completion.

A GRPO micro-batch holds G completions of each prompt, and the prompt (~800 tokens for tool calling) is far longer
than a completion (~150). CompletionLogprobs runs every row as [prompt | completion]: N * (P + T) positions, forward
and backward. Here each distinct prompt runs once, keeping its keys and values, and the completions run against
those repeated along the batch dimension: K * P + N * (T - 1) positions (P = 800, T = 150, G = 4: 1,400 instead of
3,800 per group). On a CPU, forward + backward of 2 ToolRL-shaped groups through a SmolLM2-135M-shaped model take
0.32x the padded path's time (0.35x with gradient checkpointing; bench/shared_prefix_check.py).

It is the same function, so it has the same gradient. Let f(theta) be a prompt's keys/values (every layer) and its
last hidden state, shared by branches j = 1..G with losses l_j(f, theta). Then

    dL/dtheta = sum_j dl_j/dtheta|_f + (sum_j dl_j/df) df/dtheta

i.e. the gradient of a shared prefix is the sum of its branches' gradients, sent back once through the prompt pass.
`repeat_interleave` along the batch dimension is what does it: its backward sums the G copies' gradients.

Two details carry the equality with the unshared computation:
- the first completion token's log-prob comes from the last prompt position's hidden state, so the LM head reads
  [last prompt state | completion states but the last];
- positions continue from each prompt's own length and the attention mask is [prompt mask | completion mask], so a
  completion sees exactly the keys, values and positions it sees in the padded [prompt | completion] row.

The keys/values travel in a transformers Cache whose layers never append: the prompt pass records each layer's
keys/values (replacing, not appending), the completion pass returns [prompt repeated | its own] and stores nothing.
Both are replay-safe, so they may stay in a checkpointed layer (transformers drops the cache of a checkpointed layer
unless it says so: `_keep_cache_under_checkpointing`). One forward runs the decoder twice (prompts, then completions);
DDP and FSDP2 still give the single-process gradient (tests/test_shared_prefix.py).

Notation: N rows, K distinct prompts among them (groups of consecutive rows with the same prompt), P prompt tokens
(left-padded), T completion tokens (right-padded), L = P + T, H hidden size, V vocabulary, M real completion tokens.
"""
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from grpo.logprobs import CompletionLogprobs, head_logprobs, position_ids_from_mask

# Model types checked against CompletionLogprobs (tests/test_shared_prefix.py): decoders whose attention reads and
# writes keys/values only through `cache.update` and builds its mask with `create_causal_mask`.
TRIED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
TRIED_ATTENTION = ("sdpa", "eager")


def supports_shared_prefix(model) -> bool:
    """Whether SharedPromptLogprobs is known to equal CompletionLogprobs on `model`: a tried model type, every layer
    full attention (a sliding window would need its own cache layer), a tried attention implementation."""
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return (config.model_type in TRIED_MODEL_TYPES and layer_types == {"full_attention"}
            and config._attn_implementation in TRIED_ATTENTION)


def split_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor):
    """A [left-padded prompt | completion] batch (Rollout's layout) -> its distinct prompts and group sizes.

    Consecutive rows with the same prompt (ids and mask) form a group: the G rows of a Rollout prompt, or fewer where
    a micro-batch boundary or a skipped row cuts a group. Returns prompt_ids, prompt_mask (K, P) (the first row of
    each group) and counts (K,) long, rows per group, summing to N. One host sync (K is a shape).
    """
    P = input_ids.shape[1] - completion_mask.shape[1]
    ids, mask = input_ids[:, :P], attention_mask[:, :P]                      # (N, P)
    new = torch.ones(len(ids), dtype=torch.bool, device=ids.device)          # (N,) row starts a group
    new[1:] = ((ids[1:] != ids[:-1]) | (mask[1:] != mask[:-1])).any(dim=1)
    starts = new.nonzero().squeeze(1)                                        # (K,)
    counts = torch.diff(starts, append=starts.new_tensor([len(ids)]))       # (K,)
    return ids[starts], mask[starts], counts


class _PromptLayer(DynamicLayer):
    """One layer's keys/values of the prompt pass: recorded (K, kv_heads, P, d), replaced rather than appended, so
    a checkpointed layer replaying its forward in backward records the same thing again."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class _SharedLayer(DynamicLayer):
    """One layer's keys/values for the completion pass: [prompt's, repeated to its group's rows | the completions'
    own]. Stores nothing, so a replay gives the same result; seq length (for mask and positions) is P."""

    def __init__(self, prompt: _PromptLayer, counts: torch.Tensor, rows: int):
        super().__init__()
        self.keys, self.values, self.is_initialized = prompt.keys, prompt.values, True   # (K, kv_heads, P, d)
        self.counts, self.rows = counts, rows                                # (K,) summing to N; N

    def update(self, key_states, value_states, *args, **kwargs):
        # backward of repeat_interleave: the sum over a group's rows -- the shared prefix's gradient
        keys = self.keys.repeat_interleave(self.counts, dim=0, output_size=self.rows)      # (N, kv_heads, P, d)
        values = self.values.repeat_interleave(self.counts, dim=0, output_size=self.rows)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)  # (N, kv, P+t, d)


@contextmanager
def _keep_cache_under_checkpointing(model):
    """With gradient checkpointing on, transformers replaces a decoder layer's `cache` by None (a cache that
    appends would append again when backward replays the layer) unless the layer says it only reads. Ours are
    replay-safe (above), so they say so, for the length of one forward."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    saved = [m._can_checkpoint_with_cache for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, value in zip(layers, saved):
            m._can_checkpoint_with_cache = value


class SharedPromptLogprobs(CompletionLogprobs):
    """CompletionLogprobs (same forward, same result, same gradient) that runs each group's prompt once.

    A drop-in: groups are found in the data (consecutive rows with one prompt), so any micro-batch of Rollout rows
    works, whole groups or not. A batch in which no two rows share a prompt (the warm start, G = 1) runs as one pass.
    """

    def __init__(self, model, chunk_size: int = 1024):
        assert supports_shared_prefix(model), (
            f"shared-prompt log-probs are tried on model types {TRIED_MODEL_TYPES} with full attention only and "
            f"attention {TRIED_ATTENTION}; this is {model.config.model_type} with "
            f"{model.config._attn_implementation}: use CompletionLogprobs")
        super().__init__(model, chunk_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """As CompletionLogprobs.forward: input_ids, attention_mask (N, L) = [left-padded prompt | right-padded
        completion], completion_mask (N, T) bool. Returns logp, entropy (N, T) float32, zero off-mask."""
        N, T = completion_mask.shape
        P = input_ids.shape[1] - T
        prompt_ids, prompt_mask, counts = split_prompts(input_ids, attention_mask, completion_mask)   # (K, P), (K,)
        if len(counts) == N:                                                 # nothing shared: the one plain pass
            return super().forward(input_ids, attention_mask, completion_mask, temperature)
        decoder = self.model.base_model
        layers = decoder.config.num_hidden_layers
        prompt_cache = Cache(layers=[_PromptLayer() for _ in range(layers)])
        with _keep_cache_under_checkpointing(decoder):
            prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 position_ids=position_ids_from_mask(prompt_mask), cache=prompt_cache,
                                 use_cache=False)
            last = prompt_out.last_hidden_state[:, -1]                       # (K, H) predicts completion token 0
            before = [last.repeat_interleave(counts, dim=0, output_size=N)[:, None]]     # [(N, 1, H)]
            if T > 1:                                                        # completion tokens 0..T-2 as inputs
                shared = Cache(layers=[_SharedLayer(layer, counts, N) for layer in prompt_cache.layers])
                mask = attention_mask[:, :-1]                                # (N, P + T - 1) [prompt | completion]
                out = decoder(input_ids=input_ids[:, P:-1], attention_mask=mask,
                              position_ids=position_ids_from_mask(mask)[:, P:], cache=shared, use_cache=False)
                before.append(out.last_hidden_state)                         # (N, T - 1, H)
        hidden = torch.cat(before, dim=1)                                    # (N, T, H) state before each token
        return head_logprobs(hidden, input_ids[:, P:], completion_mask, self.model.get_output_embeddings().weight,
                             self.chunk_size, temperature)


def logprobs_module(model, chunk_size: int, shared: bool) -> CompletionLogprobs:
    """The log-prob module of the update and the old/reference passes: SharedPromptLogprobs with --shared_prompt
    where the model is one it was checked on, else CompletionLogprobs (and a line that says why)."""
    if shared and not supports_shared_prefix(model):
        print(f"--shared_prompt: not for a {model.config.model_type} model with {model.config._attn_implementation} "
              f"attention (checked on {', '.join(TRIED_MODEL_TYPES)} with {' or '.join(TRIED_ATTENTION)}); every "
              f"completion runs with its whole prompt instead")
    return (SharedPromptLogprobs if shared and supports_shared_prefix(model) else CompletionLogprobs)(model, chunk_size)


def positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
              shared: bool) -> tuple[int, int]:
    """(positions the decoder computes, real ones) for a [left-padded prompt | completion] batch: the real ones are
    each distinct prompt's tokens once and every completion's; the computed ones include padding, and every row's
    prompt again without sharing."""
    N, T = completion_mask.shape
    prompt_ids, prompt_mask, counts = split_prompts(input_ids, attention_mask, completion_mask)   # (K, P)
    real = int(prompt_mask.sum()) + int(completion_mask.sum())
    computed = len(counts) * prompt_ids.shape[1] + N * T if shared else input_ids.numel()
    return computed, real
