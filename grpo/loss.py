"""The GRPO objective: group-relative advantages, the clipped surrogate, the k3 KL penalty, and the variants of
the GRPO family (how tokens are aggregated, which ratio is clipped, which tokens carry the loss) as small tables.

Which GRPO this is (each choice, and why; the loss_type, ratio, truncated and top_entropy_quantile rows are options):

| choice                    | here                                                        | source / reason |
|---------------------------|-------------------------------------------------------------|-----------------|
| advantage                 | (r - mean_group) / (std_group + 1e-4), Bessel std           | DeepSeekMath (Shao et al. 2024) eq. 3 ("outcome supervision"); ToolRL's code uses the unbiased std |
| zero-variance groups      | advantage exactly 0 (max - min < 1e-6), fraction logged     | rounding gives such groups a tiny std and an enormous advantage |
| scale=False               | r - mean_group                                              | Dr. GRPO (Liu et al. 2025): the std division re-weights easy/hard prompts |
| policy term               | -min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A)     | PPO (Schulman et al. 2017); eps_high > eps_low is DAPO's clip-higher |
| KL                        | beta * k3, in the loss, per token                           | DeepSeekMath eq. 4; k3 from Schulman, "Approximating KL divergence" (2020) |
| entropy                   | - entropy_coef * H(pi) per token, aggregated as the loss    | ToolRL's verl config (0.001) |
| loss_type dapo (default)  | sum_{i,t} l_it / (tokens in the optimizer step)             | DAPO (Yu et al. 2025): every token weighs the same; the count is fixed before the first micro-batch |
| loss_type grpo            | (1/S) sum_i (1/len_i) sum_t l_it, S = sequences in the step | DeepSeekMath eq. 3: every answer weighs the same, a long one's tokens less (docs/PITFALLS.md #4) |
| loss_type dr_grpo         | sum_{i,t} l_it / (S * max_new_tokens)                       | Dr. GRPO (Liu et al. 2025): a constant normaliser, free of the batch's lengths |
| loss_type bnpo            | per micro-batch: sum_{i,t} l_it / (its tokens * M)          | TRL's bnpo, M = micro-batches in the step: token mean per local batch, not split-invariant |
| ratio, token (default)    | ratio_it = pi(o_it) / pi_old(o_it), clipped per token       | PPO / GRPO |
| ratio, sequence           | s_i = exp(mean_t log(pi(o_it) / pi_old(o_it))), clipped per sequence | GSPO (Zheng et al. 2025); its paper clips at eps 3e-4 / 4e-4 |
| truncated completions     | in the loss (default), or out of the loss mask              | DAPO's overlong filtering (section 3.4); TRL's mask_truncated_completions |
| top_entropy_quantile q    | 1.0 (default): every token; q < 1: policy term and entropy bonus on the micro-batch's top-q entropy tokens only, KL on all | Wang et al. 2025, "Beyond the 80/20 rule" (q = 0.2) |

Every option follows TRL 1.16's GRPOTrainer (same names, same arithmetic; tests/test_loss_variants.py compares
the two). Where the arithmetic differs, on purpose: grpo and dr_grpo divide by the step's sequence count rather than
averaging per micro-batch, so a short last micro-batch is not over-weighted (equal when micro-batches are equal,
as in TRL); dapo divides by this optimizer step's own tokens (TRL: the rollout's tokens / steps_per_generation, the
same when there is one optimizer step per rollout); the entropy bonus is aggregated like the loss (TRL: always a
token mean per micro-batch).

Alternatives left out: KL inside the reward (ToolRL's verl code subtracts 0.001 * sum_t (logp_old - logp_ref)
from each sequence's score; we follow DeepSeekMath and put it in the loss); TRL's cispo, sapo, luspo and vespo
losses; GSPO-token (equal to GSPO when the advantage is the same on every token, as here).

Notation for every tensor in this file: N = sequences in the (micro-)batch = B prompts * G completions,
laid out prompt-major (the G completions of one prompt are adjacent); T = completion tokens.
"""
from collections.abc import Callable
from typing import NamedTuple

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
    Its gradient through logp follows the forward KL's (docs/PITFALLS.md #10). (N, T) -> (N, T).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


# ---- which ratio is clipped: importance_sampling_level -----------------------------------------------------------

def _sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's ratio in logs: log s_i = (1/len_i) sum_t log(pi / pi_old), over sequence i's real tokens.
    (N, T) -> (N, 1); as TRL's log_importance_weights."""
    assert mask is not None, "importance_sampling_level='sequence' needs the mask of each sequence's real tokens"
    real = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))         # (N, T); a NaN at padding stays out
    return real.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)


# importance_sampling_level -> (log_ratio (N, T), mask (N, T)) -> the log of the ratio that is clipped:
# (N, T), one per token, or (N, 1), one per sequence, shared by its tokens.
LOG_RATIOS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": lambda log_ratio, mask: log_ratio,                              # PPO / GRPO
    "sequence": _sequence_log_ratio,                                         # GSPO (Zheng et al. 2025)
}


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    eps_low: float, eps_high: float, ref_logp: torch.Tensor | None = None,
                    beta: float = 0.0, entropy: torch.Tensor | None = None,
                    entropy_coef: float = 0.0, mask: torch.Tensor | None = None,
                    importance_sampling_level: str = "token",
                    policy_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token GRPO loss, to be aggregated over the loss mask by `aggregate_loss`.

        ratio = exp(logp - old_logp)                       per token ("token"), or
        ratio = exp(mean_t (logp - old_logp))              per sequence, over its real tokens ("sequence", GSPO)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3 - entropy_coef * H

    logp, old_logp, ref_logp, entropy: (N, T); advantages: (N,); mask: (N, T) bool, the real tokens (needed for
    "sequence" only); policy_mask: (N, T) bool, the tokens that carry the policy term and the entropy bonus
    (`high_entropy_mask`; None: all), the KL term stays on every token, as in TRL.
    Returns (N, T) loss and (N, T) parts for logging: "kl" (zeros when beta is 0), "clipped" (1 where the clip was
    active; with "sequence", on every token of a clipped sequence).
    """
    A = advantages[:, None]                                                  # (N, 1)
    ratio = torch.exp(LOG_RATIOS[importance_sampling_level](logp - old_logp, mask))   # (N, T) or (N, 1); 1 on-policy
    surr1 = ratio * A                                                        # (N, T) or (N, 1)
    surr2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A                # (N, T) or (N, 1)
    loss = -torch.min(surr1, surr2).expand_as(logp)                          # (N, T)
    if policy_mask is not None:
        loss = torch.where(policy_mask, loss, torch.zeros_like(loss))
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        kl = kl_k3(logp, ref_logp)                                           # (N, T)
        loss = loss + beta * kl
    if entropy_coef != 0.0:
        bonus = entropy if policy_mask is None else torch.where(policy_mask, entropy, torch.zeros_like(entropy))
        loss = loss - entropy_coef * bonus
    return loss, {"kl": kl.detach(), "clipped": (surr2 < surr1).float().expand_as(logp)}


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of x over positions where mask is true; where() so a NaN at a masked position cannot leak."""
    return torch.where(mask, x, torch.zeros_like(x)).sum()


# ---- which tokens carry the loss ----------------------------------------------------------------------------------

def loss_mask(completion_mask: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool) -> torch.Tensor:
    """The completion mask, minus every completion with no EOS when mask_truncated (DAPO's overlong filtering,
    TRL's mask_truncated_completions: completion_mask * ~truncated). (N, T), (N,) -> (N, T) bool.

    Such a completion keeps its reward and its place in its group's advantages; it only leaves the loss. As in TRL,
    its tokens leave the token counts (dapo, bnpo), but it still counts as a sequence (grpo, dr_grpo divide by S).
    """
    return completion_mask & ~(truncated & mask_truncated)[:, None]


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """The real tokens whose entropy is in the top `top_quantile` fraction of the real tokens given (one micro-batch):
    entropy >= torch.quantile(entropies of mask's tokens, 1 - top_quantile), linear interpolation, as TRL's
    get_high_entropy_mask. 1.0: every real token (no quantile taken); 0.0: the highest-entropy token(s) only.
    entropy, mask: (N, T) -> (N, T) bool.  Wang et al. 2025, "Beyond the 80/20 rule", keep q = 0.2.

    distributed: TRL pools the micro-batches of all ranks before the quantile; this takes the tokens it is given.
    A GPU sync point (boolean indexing) when top_quantile < 1.
    """
    assert 0.0 <= top_quantile <= 1.0, f"top_entropy_quantile must be in [0, 1], got {top_quantile}"
    if top_quantile >= 1.0 or not mask.any():
        return mask
    entropy = entropy.detach()
    threshold = torch.quantile(entropy[mask].float(), 1 - top_quantile)     # scalar
    return (entropy >= threshold) & mask                                     # (N, T)


# ---- how tokens are aggregated: loss_type --------------------------------------------------------------------------

class StepCounts(NamedTuple):
    """What one optimizer step holds, summed over all ranks, counted before its first backward. distributed: each
    rank's loss is then multiplied by the number of ranks, since DDP averages their gradients."""
    tokens: torch.Tensor | int            # loss-mask tokens, clamped to >= 1
    sequences: int                        # completions, S (truncated ones included)
    micro_batches: int                    # micro-batches, M
    max_completion_length: int            # --max_new_tokens, L


# loss_type -> (mask (N, T) of one micro-batch, step) -> (per-sequence divisor: 1 or (N, 1), per-step divisor).
# Token (i, t)'s weight is 1 / (per-sequence * per-step); the weights of a whole step sum over its micro-batches,
# so gradient accumulation gives the step's loss. len_i = answer i's tokens; a long answer (len 200) against a
# short one (len 20):
LOSS_NORMALISERS: dict[str, Callable[[torch.Tensor, StepCounts], tuple]] = {
    # 1 / tokens: every token weighs the same, so the long answer weighs 10x the short one in all.
    "dapo": lambda mask, step: (1, step.tokens),
    # 1 / (len_i S): every answer weighs the same, so the long answer's tokens weigh 1/10 of the short one's.
    "grpo": lambda mask, step: (mask.sum(-1, keepdim=True).clamp(min=1), step.sequences),
    # 1 / (S L): every token the same (as dapo), by a constant that ignores the batch's lengths.
    "dr_grpo": lambda mask, step: (1, step.sequences * step.max_completion_length),
    # 1 / (micro-batch tokens * M): tokens weigh the same within a micro-batch; a micro-batch of short answers
    # gives each of its tokens more weight than one of long answers. Not split-invariant: the loss depends on
    # how the step is cut into micro-batches (and on which rows skip_zero_advantage leaves out).
    "bnpo": lambda mask, step: (1, mask.sum().clamp(min=1) * step.micro_batches),
}


def aggregate_loss(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, step: StepCounts) -> torch.Tensor:
    """One micro-batch's share of the optimizer step's loss: sum_{i,t in mask} l_it / (per-sequence * per-step),
    the divisors of LOSS_NORMALISERS[loss_type]. token_loss (N, T) float, mask (N, T) bool -> scalar.
    dapo is today's masked_sum(token_loss, mask) / step.tokens, bit for bit (x / 1 is exact)."""
    per_sequence, per_step = LOSS_NORMALISERS[loss_type](mask, step)
    return masked_sum(token_loss / per_sequence, mask) / per_step


def token_weights(mask: torch.Tensor, loss_type: str, step: StepCounts) -> torch.Tensor:
    """The weight of each token in `aggregate_loss` (its gradient with respect to token_loss). (N, T) -> (N, T)."""
    per_sequence, per_step = LOSS_NORMALISERS[loss_type](mask, step)
    return mask / per_sequence / per_step
