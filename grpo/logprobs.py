"""Log-probabilities of completion tokens, without ever building full-vocabulary logits for a batch.

Qwen's vocabulary is 151,936 tokens: float32 logits cost 0.61 MB per token (docs/PITFALLS.md #6). So the
decoder runs once to hidden states, and the LM head + log-softmax run only on the hidden states of real
completion tokens, a chunk of rows at a time. Each chunk's backward is written by hand (`_ChunkLogprobs`): it
recomputes the chunk's logits once and forms their gradient in one or two passes, so nothing of size (m, V)
is kept between forward and backward. (Checkpointing the plain expressions instead re-runs all of them and
then autograd's backward of each: on a CPU with V = 151,936, 1.2-1.3x slower updates and 0.6-0.9 GB more
memory; docs/PERFORMANCE.md.)

    z = h W^T / tau            logz = logsumexp(z)         p = exp(z - logz)
    logp = z[y] - logz         H = logz - sum_k p_k z_k    (so E_p[z] = logz - H)
    dlogp/dz = onehot(y) - p   dH/dz = -p * (z - E_p[z])
    g_z = g_logp * (onehot(y) - p) - g_H * p * (z - E_p[z]);   g_h = g_z W / tau,   g_W = g_z^T h / tau

Notation: N sequences, P prompt tokens (left-padded), T completion tokens (right-padded), L = P + T,
H hidden size, V vocabulary, M = number of real completion tokens (mask.sum()).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(target) and entropy for a chunk of rows. hidden (m, H), targets (m,), weight (V, H)."""
    z = F.linear(hidden, weight).float() / temperature                       # (m, V) float32 logits
    logz = torch.logsumexp(z, dim=-1)                                        # (m,)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - logz                 # (m,)
    entropy = logz - (torch.softmax(z, dim=-1) * z).sum(-1)                  # (m,)  H = logz - E_p[z]
    return logp, entropy


class _ChunkLogprobs(torch.autograd.Function):
    """_chunk_logprobs with the hand-written backward of the module docstring. Saves hidden, targets, weight,
    logp and entropy (all but weight of size m); the entropy's pass is skipped when the loss does not use it."""

    @staticmethod
    def forward(ctx, hidden, targets, weight, temperature):
        ctx.set_materialize_grads(False)                                     # None, not zeros, for unused outputs
        # What torch.amp.custom_fwd records, for the device the tensors are on (custom_fwd names one device type
        # when the class is defined): backward then runs under the autocast state forward ran under.
        device = hidden.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        logp, entropy = _chunk_logprobs(hidden, targets, weight, temperature)
        ctx.save_for_backward(hidden, targets, weight, logp, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        with torch.autocast(**ctx.autocast):                                 # backward under forward's autocast
            return _ChunkLogprobs._backward(ctx, grad_logp, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logp, grad_entropy):
        hidden, targets, weight, logp, entropy = ctx.saved_tensors
        tau = ctx.temperature
        z = F.linear(hidden, weight).float().div_(tau)                       # (m, V) recomputed
        logz = z.gather(-1, targets[:, None]).squeeze(-1) - logp             # (m,) = logsumexp(z)
        if grad_entropy is None:                                             # -g_logp * p, in place
            grad_z = z.sub_(logz[:, None]).exp_().mul_(-grad_logp[:, None])
        else:                                                                # -p * (g_logp + g_H * (z - E_p[z]))
            p = torch.exp(z - logz[:, None])                                 # (m, V)
            centred = z.sub_((logz - entropy)[:, None])                      # z - E_p[z], in place
            g = grad_logp[:, None] if grad_logp is not None else 0.0
            grad_z = centred.mul_(grad_entropy[:, None]).add_(g).mul_(p).neg_()
        if grad_logp is not None:                                            # + g_logp * onehot(y)
            grad_z.scatter_add_(-1, targets[:, None], grad_logp[:, None])
        grad_z = grad_z.div_(tau).to(weight.dtype)                           # (m, V)
        grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None   # (m, H)
        grad_weight = grad_z.T @ hidden if ctx.needs_input_grad[2] else None # (V, H)
        return grad_hidden, None, grad_weight, None


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
        self.computed_positions = input_ids.numel()                          # what the decoder ran (a metric)
        return head_logprobs(hidden, input_ids[:, -T:], completion_mask, self.model.get_output_embeddings().weight,
                             self.chunk_size, temperature)


def head_logprobs(hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  chunk_size: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head on real target positions only, `chunk_size` rows at a time: hidden (n, t, H) is the state before
    each target, targets and mask (n, t), weight (V, H). Returns logp, entropy (n, t) float32, zero off-mask.
    Shared by every way of running the decoder (padded, shared prompt, packed)."""
    rows = hidden[mask]                                                      # (M, H) real targets only
    flat_targets = targets[mask]                                             # (M,)
    logp_parts, ent_parts = [], []
    for i in range(0, rows.shape[0], chunk_size):
        lp, ent = _ChunkLogprobs.apply(rows[i:i + chunk_size], flat_targets[i:i + chunk_size], weight,
                                       temperature)                          # (m,), (m,)
        logp_parts.append(lp)
        ent_parts.append(ent)
    # Zeros tied to the graph, so a batch with no target tokens still has a (zero) gradient path.
    zeros = hidden.sum(-1).float() * 0                                       # (n, t)
    if not logp_parts:
        return zeros, zeros
    return zeros.masked_scatter(mask, torch.cat(logp_parts)), zeros.masked_scatter(mask, torch.cat(ent_parts))
