"""The GRPO update of one rollout batch: old and reference log-probs once, then `steps_per_generation` optimizer
steps of the clipped surrogate + beta * k3 KL (grpo/loss.py), each over its share of the B*G completions, in
micro-batches whose gradients add up to the whole mini-batch's: the loss is divided by the mini-batch's token
count, fixed before the first backward (or by another normaliser: --loss_type). Also the learning-rate schedule.
`policy` is a CompletionLogprobs, or with --shared_prompt a SharedPromptLogprobs, which runs each group's prompt
once (grpo/shared_prefix.py): micro-batches keep a group's rows adjacent, and take groups in order of prompt length
(by_prompt_length), so that little is computed on padding.

Notation: N = B * G completions of the rollout (prompt-major), T = completion tokens.
"""
import math
import warnings
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from grpo import dist
from grpo.logprobs import CompletionLogprobs
from grpo.loss import StepCounts, aggregate_loss, grpo_token_loss, high_entropy_mask, loss_mask, masked_sum
from grpo.rollout import Rollout
from grpo.shared_prefix import real_positions


def lr_factor(kind: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """Learning rate at `step` over the base rate: linear warm-up from 0 over `warmup_steps`, then constant, or
    a linear or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]


def lr_schedule(optimizer, kind: str, warmup_steps: int, total_steps: int, start_step: int = 0) -> LambdaLR:
    """torch's LambdaLR over lr_factor, at `start_step` (each param group's "initial_lr" is its base rate); its
    state is saved in every checkpoint's trainer state (grpo/checkpoint.py)."""
    # a step skipped for NaN/inf advances the schedule without an optimizer step: as meant, not worth a warning
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    return LambdaLR(optimizer, partial(lr_factor, kind, warmup_steps, total_steps), last_epoch=start_step - 1)


def by_prompt_length(rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
    """`rows` in order of prompt length, so that a micro-batch's groups pad their prompts to similar lengths. A
    stable sort: a group's rows share a prompt length and stay together, in order. The gradient of an optimizer step
    is a sum over its rows, so only rounding changes (except under bnpo's per-micro-batch normaliser or an entropy
    quantile per micro-batch: the update keeps the rollout's order there)."""
    T = rollout.completion_mask.shape[1]
    return rows[torch.sort(rollout.attention_mask[rows, :-T].sum(1), stable=True).indices]


@torch.no_grad()
def rollout_logprobs(policy: CompletionLogprobs, rollout: Rollout, cfg, autocast) -> torch.Tensor:
    """log pi(token) for every completion token of the rollout, without gradients: (N, T), 0 off-mask."""
    out = torch.zeros(rollout.completion_mask.shape, device=rollout.input_ids.device)
    rows = by_prompt_length(rollout, torch.arange(len(out), device=out.device))
    for micro in rows.split(cfg.micro_batch_size):
        mb = rollout.select(micro)
        with autocast():
            logp, _ = policy(mb.input_ids, mb.attention_mask, mb.completion_mask, cfg.temperature)
        out[micro, :logp.shape[1]] = logp
    return out


def policy_update(policy, optimizer, rollout: Rollout, advantages, old_logp, ref_logp, cfg, autocast) -> dict:
    """`steps_per_generation` optimizer steps over equal shares of the rollout; returns mean statistics.
    Out of memory stops the run with one line naming the knobs that lower it."""
    try:
        return _policy_update(policy, optimizer, rollout, advantages, old_logp, ref_logp, cfg, autocast)
    except torch.OutOfMemoryError as e:
        raise SystemExit(f"out of memory in the update: lower --micro_batch_size (now {cfg.micro_batch_size}), "
                         f"--max_new_tokens or --max_prompt_length") from e


def _policy_update(policy, optimizer, rollout: Rollout, advantages, old_logp, ref_logp, cfg, autocast) -> dict:
    N, W = len(advantages), dist.world_size()
    rows_per_step = N // cfg.steps_per_generation
    # With no KL and no entropy term, a zero-advantage row's loss is exactly 0: skip its forward/backward (not under
    # bnpo or an entropy quantile, whose normaliser and quantile depend on the micro-batch's rows).
    # distributed: not with several ranks, which must all run the same micro-batches (FSDP communicates in each).
    skip_flat = (cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0 and W == 1
                 and cfg.loss_type != "bnpo" and cfg.top_entropy_quantile == 1.0)
    # micro-batches of similar prompt lengths; not where the loss depends on which rows share a micro-batch
    regroup = cfg.loss_type != "bnpo" and cfg.top_entropy_quantile == 1.0
    keep = loss_mask(rollout.completion_mask, rollout.truncated, cfg.mask_truncated_completions)    # (N, T)
    totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped": 0,
              "positions_computed": 0, "positions_real": 0}
    if cfg.mask_truncated_completions:                  # completions cut at --max_new_tokens, out of the loss
        totals["frac_masked_truncated"] = rollout.truncated.float().mean().item()
    for k in range(cfg.steps_per_generation):
        rows = torch.arange(k * rows_per_step, (k + 1) * rows_per_step, device=advantages.device)
        # Every row counts, fixed before backward. distributed: the counts of all ranks' rows together.
        n_tokens = dist.sum_over_ranks(keep[rows].sum()).clamp(min=1)
        step = StepCounts(n_tokens, len(rows) * W, len(rows.split(cfg.micro_batch_size)) * W, cfg.max_new_tokens)
        if skip_flat:
            rows = rows[advantages[rows] != 0] if (advantages[rows] != 0).any() else rows[:1]
        if regroup:
            rows = by_prompt_length(rollout, rows)
        micro_batches = rows.split(cfg.micro_batch_size)
        for i, micro in enumerate(micro_batches):
            mb = rollout.select(micro)
            t = mb.completion_mask.shape[1]
            mask = keep[micro, :t]                                                               # (n, t)
            # distributed: DDP all-reduces gradients in the backward of the step's last micro-batch only
            with autocast(), dist.no_sync(policy, sync=i == len(micro_batches) - 1):
                logp, entropy = policy(mb.input_ids, mb.attention_mask, mb.completion_mask, cfg.temperature)
            # One optimizer step per rollout: on-policy, so old = current (ratio 1, clipping inactive).
            old = logp.detach() if cfg.steps_per_generation == 1 else old_logp[micro, :t]
            ref = ref_logp[micro, :t] if ref_logp is not None else None
            totals["positions_computed"] += getattr(policy, "module", policy).computed_positions        # DDP: .module
            totals["positions_real"] += real_positions(mb.input_ids, mb.attention_mask, mb.completion_mask)
            token_loss, parts = grpo_token_loss(logp, old, advantages[micro], cfg.epsilon, cfg.epsilon_high, ref,
                                                cfg.beta, entropy, cfg.entropy_coef, mask, cfg.importance_sampling_level,
                                                high_entropy_mask(entropy, mask, cfg.top_entropy_quantile))
            # distributed: DDP and FSDP average gradients over ranks, so each rank's loss is multiplied by the
            # number of ranks: their average is then the whole batch's loss, and its gradient the single-process one.
            loss = aggregate_loss(token_loss, mask, cfg.loss_type, step) * W
            loss.backward()
            scale = W / (n_tokens.item() * cfg.steps_per_generation)   # token means of the step; distributed: as the loss
            totals["loss"] += loss.item() / cfg.steps_per_generation
            totals["kl"] += masked_sum(parts["kl"], mask).item() * scale
            totals["entropy"] += masked_sum(entropy.detach(), mask).item() * scale
            totals["clip_fraction"] += masked_sum(parts["clipped"], mask).item() * scale
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:                           # a NaN/inf step would poison the weights: skip it (BadSteps reports it)
            totals["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] += grad_norm.item() / cfg.steps_per_generation
    # the decoder's positions over the real ones (padding, and prompts repeated without --shared_prompt)
    totals["positions_ratio"] = totals.pop("positions_computed") / max(1, totals.pop("positions_real"))
    return totals
