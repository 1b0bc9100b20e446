"""Completion log-probs with each prompt computed once per group, not once per completion.

A GRPO micro-batch holds G completions of each prompt, and the prompt (~800 tokens for tool calling) is far longer
than a completion (~150). CompletionLogprobs runs every row as [prompt | completion]: N * (P + T) positions, forward
and backward, most of them prompts again and padding. Here each distinct prompt runs once, keeping its keys and
values, and then its completions run end to end in one row against those keys and values, each attending to the
prompt and to its own earlier tokens only: K * P + K * S positions, S the longest group's completion tokens (P = 800,
G = 4 completions of ~150: 1,400 instead of 3,800 per group, whatever their lengths). On a CPU, forward + backward of
2 ToolRL-shaped groups through a SmolLM2-135M-shaped model take 0.32x the padded path's time (0.35x with gradient
checkpointing; bench/shared_prefix_check.py).

It is the same function, so it has the same gradient. Let f(theta) be a prompt's keys/values (every layer) and its
last hidden state, shared by branches j = 1..G with losses l_j(f, theta). Then

    dL/dtheta = sum_j dl_j/dtheta|_f + (sum_j dl_j/df) df/dtheta

i.e. the gradient of a shared prefix is the sum of its branches' gradients, sent back once through the prompt pass.
Every completion of a row reads the same prompt keys/values (and the same last state): autograd adds their
gradients there, once per group.

Three details carry the equality with the unshared computation:
- the first completion token's log-prob comes from the last prompt position's hidden state, and token j's from the
  state at the completion's token j - 1, so a completion's last token is never an input (`completion_rows`);
- positions continue from each prompt's own length for every completion of the row;
- the mask of the completion pass (`completion_pass_mask`) lets a token see its prompt's real keys and its own
  completion's tokens up to itself, nothing of its neighbours: exactly what it sees in its padded row.

The keys/values travel in a transformers Cache whose layers never append: the prompt pass records each layer's
keys/values (replacing, not appending), the completion pass returns [prompt's | its own] and stores nothing.
Both are replay-safe, so they may stay in a checkpointed layer (transformers drops the cache of a checkpointed layer
unless it says so: `_keep_cache_under_checkpointing`). One forward runs the decoder twice (prompts, then completions);
DDP and FSDP2 still give the single-process gradient (tests/test_shared_prefix.py). Left: the prompts of a
micro-batch's K groups are left-padded to the longest (K * P): one group per micro-batch computes none.

Notation: N rows, K distinct prompts among them (groups of consecutive rows with the same prompt), P prompt tokens
(left-padded), T completion tokens (right-padded), L = P + T, S tokens of the longest row of the completion pass,
H hidden size, V vocabulary, M real completion tokens.
"""
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from grpo.logprobs import CompletionLogprobs, head_logprobs, position_ids_from_mask

# Model types checked against CompletionLogprobs (tests/test_shared_prefix.py): decoders whose attention reads and
# writes keys/values only through `cache.update` and takes a 4D attention mask as given (`create_causal_mask`).
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
    """One layer's keys/values for the completion pass: [its group's prompt's | the group's completions' own].
    Stores nothing, so a replay gives the same result; seq length (for mask and positions) is P."""

    def __init__(self, prompt: _PromptLayer):
        super().__init__()
        self.keys, self.values, self.is_initialized = prompt.keys, prompt.values, True   # (K, kv_heads, P, d)

    def update(self, key_states, value_states, *args, **kwargs):
        # every completion of the row reads the one prompt tensor: backward sums their gradients into it
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


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


def completion_rows(completion_ids: torch.Tensor, completion_mask: torch.Tensor, counts: torch.Tensor,
                    prompt_lengths: torch.Tensor):
    """A group's completions end to end in one row, no padding between them: each completion's tokens but its last
    are inputs (the state before its first token is its prompt's last), at positions that continue its prompt.

    completion_ids, completion_mask (N, T): right-padded completions; counts (K,): rows per group; prompt_lengths
    (K,). Returns ids, position_ids, segment (K, S): the rows' input tokens, their positions, the completion (its row
    number in the batch) each one belongs to, -1 on padding; and index (N, T): where the state before each target
    token is in [the K prompts' last states | the K * S row states], 0 off-mask. S: the longest row (a host sync).
    """
    N, T = completion_mask.shape
    K, device = len(counts), completion_ids.device
    group = torch.repeat_interleave(torch.arange(K, device=device), counts, output_size=N)   # (N,)
    inputs = (completion_mask.sum(1) - 1).clamp(min=0)                       # (N,) input tokens per completion
    before = inputs.cumsum(0) - inputs                                       # (N,) inputs of all earlier rows
    start = before - before[counts.cumsum(0) - counts][group]                # (N,) offset in its group's row
    S = int((start + inputs).max())
    j = torch.arange(T - 1, device=device)                                   # (T - 1,) input j = token j
    valid = j < inputs[:, None]                                              # (N, T - 1)
    rows, cols = group[:, None].expand(N, T - 1)[valid], (start[:, None] + j)[valid]     # (I,) each
    ids = completion_ids.new_zeros(K, S)
    ids[rows, cols] = completion_ids[:, :-1][valid]
    segment = torch.full((K, S), -1, device=device)
    segment[rows, cols] = torch.arange(N, device=device)[:, None].expand(N, T - 1)[valid]
    position_ids = torch.zeros(K, S, dtype=torch.long, device=device)
    position_ids[rows, cols] = (prompt_lengths[group][:, None] + j)[valid]
    index = torch.zeros(N, T, dtype=torch.long, device=device)
    index[:, 0] = group                                                      # token 0: the prompt's last state
    index[:, 1:] = torch.where(valid, K + group[:, None] * S + start[:, None] + j, 0)   # token j+1: input j's
    return ids, position_ids, segment, index


def completion_pass_mask(prompt_mask: torch.Tensor, segment: torch.Tensor, attention: str, dtype) -> torch.Tensor:
    """What each input of the completion pass attends to: its prompt's real keys, and its own completion's tokens up
    to itself, nothing of the other completions in its row. prompt_mask (K, P), segment (K, S) as completion_rows
    gives it. Returns (K, 1, S, P + S) in the format transformers' own masks take for `attention`: bool for sdpa,
    0 / the dtype's minimum added to the scores for eager."""
    K, S = segment.shape
    causal = torch.ones(S, S, dtype=torch.bool, device=segment.device).tril()                   # (S, S)
    own = (segment[:, :, None] == segment[:, None, :]) & causal                                 # (K, S, S)
    mask = torch.cat([prompt_mask.bool()[:, None].expand(K, S, -1), own], dim=2)[:, None]      # (K, 1, S, P + S)
    if attention == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


class SharedPromptLogprobs(CompletionLogprobs):
    """CompletionLogprobs (same forward, same result, same gradient) that runs each group's prompt once, and its
    completions end to end in one row after it, so no position is computed twice or for padding between them.

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
        K, decoder = len(counts), self.model.base_model
        ids, position_ids, segment, index = completion_rows(input_ids[:, P:], completion_mask, counts,
                                                            prompt_mask.sum(1))   # (K, S) x 3, (N, T)
        prompt_cache = Cache(layers=[_PromptLayer() for _ in range(decoder.config.num_hidden_layers)])
        with _keep_cache_under_checkpointing(decoder):
            prompt_out = decoder(input_ids=prompt_ids, attention_mask=prompt_mask,
                                 position_ids=position_ids_from_mask(prompt_mask), cache=prompt_cache,
                                 use_cache=False)
            states = [prompt_out.last_hidden_state[:, -1]]                   # (K, H) predicts each token 0
            if ids.shape[1]:                                                 # some completion has 2+ tokens
                shared = Cache(layers=[_SharedLayer(layer) for layer in prompt_cache.layers])
                mask = completion_pass_mask(prompt_mask, segment, decoder.config._attn_implementation,
                                            prompt_out.last_hidden_state.dtype)            # (K, 1, S, P + S)
                out = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=shared,
                              use_cache=False)
                states.append(out.last_hidden_state.flatten(0, 1))          # (K * S, H)
        hidden = torch.cat(states)[index]                                    # (N, T, H) state before each token
        self.computed_positions = K * P + ids.numel()                        # what the decoder ran (a metric)
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


def real_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> int:
    """The decoder positions a [left-padded prompt | completion] batch needs at least (the denominator of the
    update's positions_ratio): each distinct prompt's tokens once and every completion token but its last, which
    predicts nothing."""
    _, prompt_mask, _ = split_prompts(input_ids, attention_mask, completion_mask)                 # (K, P)
    return int(prompt_mask.sum()) + int((completion_mask.sum(1) - 1).clamp(min=0).sum())
