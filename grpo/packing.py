"""Sequence packing: whole sequences laid end to end in rows, so the decoder computes no padding at all.

The warm start's batches are [left-padded prompts | right-padded targets]: every row is as long as the longest
prompt plus the longest target, and all of it runs forward and backward (ToolRL's SFT400, 16 examples a step:
1.85x the real positions). Here the sequences (prompt + target) go end to end into rows of at most C tokens
(C = the longest sequence by default), first-fit by decreasing length, and each row is its own forward of
exactly its tokens: computed/real positions = 1. Each sequence keeps its own positions (0, 1, ... from its first
token) and attends only to earlier tokens of its own sequence.

No mask is built here: given position_ids that restart and no attention_mask, transformers (masking_utils,
`find_packed_sequence_indices`) builds the block-diagonal causal mask itself for eager and sdpa attention, and
flash-attention reads the same position_ids as variable-length sequences. Under sdpa/eager attention still scores a
row's whole S x S square (the mask only hides the other sequences' keys), so rows stop at C tokens: one row of every
sequence would have no padding either, but its attention grows with the square of the batch's tokens. On a CPU
(bench/shared_prefix_check.py, 8 SFT400 sequences, an 8-layer SmolLM2-shaped model, forward + backward): rows of C
tokens take 0.63x the padded batch's time, one row 2.0x. With C the longest sequence, SFT400's lengths (570 to
2,706 tokens) rarely share a row: most of the gain is computing no padding; packing spares forwards for the short
ones.

    logp[0, s] = log pi(input_ids[0, s] | the earlier tokens of its sequence)     where target_mask[0, s]

Notation: n sequences, S tokens in a row, C row capacity, H hidden size.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grpo.logprobs import head_logprobs


@dataclass
class PackedRow:
    """Whole sequences prompt_i + target_i end to end. Data contract: sequence `sequences[j]` starts at position 0;
    target tokens are marked in order, sequence by sequence."""
    input_ids: torch.Tensor       # (1, S) long
    position_ids: torch.Tensor    # (1, S) long: restarts at 0 where a sequence starts
    target_mask: torch.Tensor     # (1, S) bool: a target token, scored from the state before it
    sequences: list[int]          # which sequences the row holds, in order (indices into pack's lists)
    target_lengths: list[int]     # their targets' lengths, in the same order

    def split_targets(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(1, S) per-token values -> one (len(target_i),) tensor per sequence of the row, in `sequences` order."""
        return list(values[self.target_mask].split(self.target_lengths))


def pack(prompts: list[list[int]], targets: list[list[int]], row_tokens: int | None = None) -> list[PackedRow]:
    """Pack prompt_i + target_i into rows of at most `row_tokens` tokens (default: the longest sequence).

    First-fit decreasing: sequences by decreasing length, each into the first row with room. Every prompt must be
    non-empty: the first target's log-prob comes from the state of the last prompt token.
    """
    assert all(prompts), "every prompt needs a token: the first target is scored from the state before it"
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]
    capacity = row_tokens or max(lengths)
    assert max(lengths) <= capacity, f"a sequence of {max(lengths)} tokens does not fit rows of {capacity}"
    rows, fill = [], []                                   # sequence indices per row, tokens per row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in range(len(rows)) if fill[r] + lengths[i] <= capacity), len(rows))
        if r == len(rows):
            rows.append([])
            fill.append(0)
        rows[r].append(i)
        fill[r] += lengths[i]
    return [_row([prompts[i] for i in members], [targets[i] for i in members], members) for members in rows]


def _row(prompts: list[list[int]], targets: list[list[int]], members: list[int]) -> PackedRow:
    ids = [tok for p, t in zip(prompts, targets) for tok in p + t]
    positions = [s for p, t in zip(prompts, targets) for s in range(len(p) + len(t))]
    is_target = [s >= len(p) for p, t in zip(prompts, targets) for s in range(len(p) + len(t))]
    return PackedRow(torch.tensor([ids]), torch.tensor([positions]), torch.tensor([is_target]), members,
                     [len(t) for t in targets])


class PackedLogprobs(nn.Module):
    """Wraps a causal LM; forward returns log-probs and entropies of the target tokens of packed rows.

    A module, as CompletionLogprobs, so that DDP / FSDP can wrap the forward the loss uses.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, target_mask: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, position_ids, target_mask: (1, S), as `pack` makes them.
        Returns logp, entropy: (1, S) float32, zero where target_mask is false."""
        # no attention_mask and no cache: transformers reads the restarts of position_ids as sequence boundaries
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state[:, :-1]                               # (1, S-1, H): state before s = 1..S-1
        logp, entropy = head_logprobs(hidden, input_ids[:, 1:], target_mask[:, 1:],
                                      self.model.get_output_embeddings().weight, self.chunk_size, temperature)
        return F.pad(logp, (1, 0)), F.pad(entropy, (1, 0))                   # (1, S): column 0 is never a target
