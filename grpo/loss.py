"""The GRPO objective: group-relative advantages, the clipped surrogate, the k3 KL penalty.

Which GRPO this is (each choice, and why):

| choice                    | here                                                        | source / reason |
|---------------------------|-------------------------------------------------------------|-----------------|
| advantage                 | (r - mean_group) / (std_group + 1e-4), Bessel std           | DeepSeekMath (Shao et al. 2024) eq. 3 ("outcome supervision"); ToolRL's code uses the unbiased std |
| zero-variance groups      | advantage exactly 0 (max - min < 1e-6), fraction logged     | rounding gives such groups a tiny std and an enormous advantage |
| scale=False               | r - mean_group                                              | Dr. GRPO (Liu et al. 2025): the std division re-weights easy/hard prompts |
| policy term               | -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A)     | PPO (Schulman et al. 2017); eps_high > eps_low is DAPO's clip-higher |
| KL                        | beta * k3, in the loss, per token                           | DeepSeekMath eq. 4; k3 from Schulman, "Approximating KL divergence" (2020) |
| entropy                   | - entropy_coef * H(pi) per token                            | ToolRL's verl config (0.001) |
| loss aggregation          | sum over every completion token / tokens in optimizer step  | DAPO's token-level loss; the count is fixed before the first micro-batch |

Alternatives left out: KL inside the reward (ToolRL's verl code subtracts 0.001 * sum_t (logp_old - logp_ref)
from each sequence's score; we follow DeepSeekMath and put it in the loss), per-sequence mean then mean over
sequences (weights long completions' tokens less: GRPO_NOTES trap 4), Dr. GRPO's constant normaliser.

Notation for every tensor in this file: N = sequences in the (micro-)batch = B prompts * G completions,
laid out prompt-major (the G completions of one prompt are adjacent); T = completion tokens.
"""
import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), one advantage per completion.

    rewards: (N,) prompt-major, N = B * G.  Returns (N,) float32.
    A group whose rewards are all equal (max - min < 1e-6) gets exactly 0: it carries no signal.
    """
    assert rewards.dim() == 1 and rewards.numel() % group_size == 0, \
        f"rewards must be flat with a multiple of group_size={group_size} entries, got {tuple(rewards.shape)}"
    r = rewards.float().view(-1, group_size)                                 # (B, G)
    advantages = r - r.mean(dim=1, keepdim=True)                             # (B, G)
    if scale:
        advantages = advantages / (r.std(dim=1, keepdim=True) + eps)         # Bessel-corrected std
    flat = (r.max(dim=1).values - r.min(dim=1).values) < 1e-6                # (B,)
    advantages = torch.where(flat[:, None], torch.zeros_like(advantages), advantages)
    return advantages.view(-1)                                               # (N,)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (and so whose advantages are all 0)."""
    r = rewards.float().view(-1, group_size)                                 # (B, G)
    return ((r.max(dim=1).values - r.min(dim=1).values) < 1e-6).float().mean().item()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref_logp - logp.

    Schulman (2020), "Approximating KL divergence": unbiased, always >= 0, and 0 where the policies agree.
    Its gradient through logp follows the forward KL's (GRPO_NOTES trap 10). (N, T) -> (N, T).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None,
                    beta: float = 0.0, entropy: torch.Tensor | None = None,
                    entropy_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Per-token GRPO loss (to be summed over completion tokens and divided by their count).

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 - entropy_coef * H

    logp, old_logp, ref_logp, entropy: (N, T); advantages: (N,).  Returns (N, T) loss and (N, T) parts
    for logging: "kl" (zeros when beta is 0), "clipped" (1 where the clip was active).
    """
    A = advantages[:, None]                                                  # (N, 1)
    ratio = torch.exp(logp - old_logp)                                       # (N, T); 1 on-policy
    surr1 = ratio * A                                                        # (N, T)
    surr2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A                # (N, T)
    loss = -torch.min(surr1, surr2)                                          # (N, T)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        kl = kl_k3(logp, ref_logp)                                           # (N, T)
        loss = loss + beta * kl
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    return loss, {"kl": kl.detach(), "clipped": (surr2 < surr1).float()}


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over positions where mask is true; where() so a NaN at a masked position cannot leak."""
    return torch.where(mask, x, torch.zeros_like(x)).sum()
