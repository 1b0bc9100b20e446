"""A leaner LM-head chunk for grpo/logprobs.py: the same log-probs and entropies, fewer passes over (m, V).

grpo/logprobs.py checkpoints `_chunk_logprobs` per chunk, so backward runs the whole chunk again (the logits
matmul plus about seven element-wise passes over the (m, V) logits: divide by the temperature, logsumexp,
softmax, product, sum) and then autograd's backward of each of those passes. With V = 151,936 and a small
model, those element-wise passes cost as much as the matmuls. This autograd Function gives the same values
and gradients with one recompute of the logits and one or two element-wise passes in backward:

    z = (h / tau) W^T          logz = logsumexp(z)        p = exp(z - logz)
    logp = z[y] - logz         H = logz - sum_k p_k z_k    (so E_p[z] = logz - H)
    dlogp/dz = onehot(y) - p   dH/dz = -p * (z - E_p[z])
    g_z = g_logp * (onehot(y) - p) - g_H * p * (z - E_p[z]);  g_h = g_z W / tau,  g_W = g_z^T h / tau

Only h, y, logz and H are kept between forward and backward (no (m, V) tensor); the entropy's gradient pass
is skipped when the loss does not use the entropy (entropy_coef = 0: it is only logged).

`install()` swaps it into grpo.logprobs for an A/B measurement (bench_grpo.py --logprobs fused); moving it into
grpo/logprobs.py is a small change described in docs/PERFORMANCE.md.

Notation: m rows of the chunk, H hidden size, V vocabulary.
"""
import torch
import torch.nn.functional as F


def chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward only: log pi(target) and entropy. hidden (m, H), targets (m,), weight (V, H) -> (m,), (m,)."""
    z = F.linear(hidden / temperature if temperature != 1.0 else hidden, weight).float()   # (m, V)
    logz = torch.logsumexp(z, dim=-1)                                                      # (m,)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - logz                               # (m,)
    expected_z = torch.softmax(z, dim=-1).mul_(z).sum(-1)                                  # (m,) E_p[z]
    return logp, logz - expected_z


class ChunkLogprobs(torch.autograd.Function):
    """chunk_logprobs with a hand-written backward that recomputes the logits once."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, targets, weight, temperature):
        ctx.set_materialize_grads(False)
        with torch.no_grad():
            logp, entropy = chunk_logprobs(hidden, targets, weight, temperature)
        ctx.save_for_backward(hidden, targets, weight, logp, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")                               # backward under forward's autocast
    def backward(ctx, grad_logp, grad_entropy):
        hidden, targets, weight, logp, entropy = ctx.saved_tensors
        tau = ctx.temperature
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        with torch.no_grad():
            z = F.linear(hidden / tau if tau != 1.0 else hidden, weight).float()            # (m, V) recomputed
            logz = z.gather(-1, targets[:, None]).squeeze(-1) - logp                        # (m,) = logsumexp(z)
            if grad_entropy is None:
                grad_z = z.sub_(logz[:, None]).exp_().mul_(-grad_logp[:, None])             # -g_logp * p, in place
            else:
                p = torch.exp(z - logz[:, None])                                            # (m, V)
                centred = z.sub_((logz - entropy)[:, None])                                 # z - E_p[z], in place
                g = grad_logp[:, None] if grad_logp is not None else 0.0
                grad_z = centred.mul_(grad_entropy[:, None]).add_(g).mul_(p).neg_()        # -p (g_lp + g_H (z - Ez))
            if grad_logp is not None:
                grad_z.scatter_add_(-1, targets[:, None], grad_logp[:, None].to(grad_z.dtype))   # + g_logp onehot
            grad_z = grad_z.to(weight.dtype)
            if tau != 1.0:
                grad_z = grad_z / tau
            grad_hidden = grad_z @ weight if ctx.needs_input_grad[0] else None              # (m, H)
            grad_weight = grad_z.T @ hidden if ctx.needs_input_grad[2] else None            # (V, H)
        return grad_hidden, None, grad_weight, None


def install(logprobs_module) -> None:
    """Use the fused chunk in grpo.logprobs: no checkpoint needed, since nothing of size (m, V) is saved."""
    logprobs_module._chunk_logprobs = chunk_logprobs
    logprobs_module.checkpoint = lambda fn, hidden, targets, weight, temperature, use_reentrant=False: \
        ChunkLogprobs.apply(hidden, targets, weight, temperature)
