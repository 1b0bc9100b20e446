"""Log-probabilities of completion tokens, without ever building full-vocabulary logits for a batch.

Qwen's vocabulary is 151,936 tokens: float32 logits cost 0.61 MB per token (GRPO_NOTES trap 6). So the
decoder runs once to hidden states, and the LM head + log-softmax run only on the hidden states of real
completion tokens, a chunk of rows at a time. Under autograd each chunk is checkpointed, so backward
recomputes its logits instead of keeping them.

Notation: N sequences, P prompt tokens (left-padded), T completion tokens (right-padded), L = P + T,
H hidden size, V vocabulary, M = number of real completion tokens (mask.sum()).
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and entropy for a chunk of rows. hidden (m, H), targets (m,), weight (V, H)."""
    logits = F.linear(hidden, weight).float() / temperature                  # (m, V) float32
    logz = torch.logsumexp(logits, dim=-1)                                   # (m,)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz            # (m,)
    entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)        # (m,)  H = log Z - E_p[logit]
    return logp, entropy


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them: (N, L) -> (N, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class CompletionLogprobs(nn.Module):
    """Wraps a causal LM; forward returns per-token log-probs and entropies of the completion part.

    A module (rather than a function) so that DDP / FSDP can wrap exactly the forward that the loss uses.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: (N, L) = [left-padded prompt | right-padded completion];
        completion_mask: (N, T) bool, true on real completion tokens (EOS included).
        Returns logp, entropy: (N, T) float32, zero where completion_mask is false.
        """
        T = completion_mask.shape[1]
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        hidden = out.last_hidden_state[:, -T - 1:-1]                         # (N, T, H): state before each token
        rows = hidden[completion_mask]                                       # (M, H) real tokens only
        targets = input_ids[:, -T:][completion_mask]                         # (M,)
        weight = self.model.get_output_embeddings().weight                   # (V, H)
        logp_parts, ent_parts = [], []
        for i in range(0, rows.shape[0], self.chunk_size):
            args = (rows[i:i + self.chunk_size], targets[i:i + self.chunk_size], weight, temperature)
            if torch.is_grad_enabled():                                      # recompute logits in backward
                lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            else:
                lp, ent = _chunk_logprobs(*args)
            logp_parts.append(lp)
            ent_parts.append(ent)
        # Zeros tied to the graph, so a batch with no completion tokens still has a (zero) gradient path.
        zeros = hidden.sum(-1).float() * 0                                   # (N, T)
        if not logp_parts:
            return zeros, zeros
        logp = zeros.masked_scatter(completion_mask, torch.cat(logp_parts))  # (N, T)
        entropy = zeros.masked_scatter(completion_mask, torch.cat(ent_parts))
        return logp, entropy
