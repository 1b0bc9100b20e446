"""The one place non-finite values are handled, for the warm start and GRPO alike.

A step that meets NaN or inf (in the weights, the sampling logits, the rewards, the loss or the gradient) is
skipped and counted; after --max_bad_steps such steps in a row the run stops with one message. Skipped
gradients leave the weights as they were, so they are saved then; NaN/inf weights or logits mean they are
lost, and no checkpoint is written while they may be broken.
"""
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from grpo import checkpoint as ckpt
from grpo import dist
from grpo.cli import config_json
from grpo.rollout import NonFiniteLogits


class BadSteps:
    """Counts the current run of non-finite steps. `stop(step, bad_steps)` is called when it reaches `limit`
    (it raises SystemExit); without one, `record`'s answer says when to stop."""

    def __init__(self, limit: int, stop: Callable | None = None):
        self.limit, self.stop, self.problems = limit, stop, []      # problems: the current run of bad steps

    def record(self, problem: str | None, step: int) -> bool:
        """problem: what was non-finite at this step (None: nothing). True when the run must stop."""
        if problem is None:
            self.problems = []
            return False
        self.problems.append(problem)
        tqdm.write(f"step {step}: non-finite {problem}: skipped ({len(self.problems)} in a row)")
        if len(self.problems) >= self.limit and self.stop:
            self.stop(step, self)
        return len(self.problems) >= self.limit

    @property
    def weights_broken(self) -> bool:
        """Skipped gradients leave the weights as they were; NaN/inf weights or logits mean they are lost."""
        return any(p.startswith(("weights", "logits", "loss")) for p in self.problems)

    def sample(self, model, generate: Callable):
        """(generate()'s rollout, None), or (None, what was not finite) when the weights are not finite or sampling
        met NaN/inf logits on any rank: the caller then skips the step and records it."""
        problem, rollout = None if finite_weights(model) else "weights", None
        if problem is None:
            try:
                rollout = generate()
            except NonFiniteLogits:
                problem = "logits while sampling"
        # distributed: logits differ by rank; if any rank met NaN/inf, every rank skips (the update is collective)
        device = next(model.parameters()).device
        if dist.sum_over_ranks(torch.tensor(float(problem is not None), device=device)).item() > 0:
            return None, problem or "logits while sampling (on another rank)"
        return rollout, None

    def check_update(self, step: int, rewards: torch.Tensor, metrics: dict) -> None:
        """After the update: NaN rewards make a NaN loss with good weights; a NaN loss from finite advantages is
        the weights' doing; a non-finite gradient was skipped by the update (metrics["skipped"])."""
        problem = ("rewards" if not torch.isfinite(rewards).all() else "loss" if not math.isfinite(metrics["loss"])
                   else "gradient" if metrics["skipped"] else None)
        self.record(problem, step)


def finite_weights(model) -> bool:
    """Every weight finite, in one host sync. distributed: FSDP's shards are checked on every rank, together."""
    bad = torch.stack([~(p.to_local() if hasattr(p, "to_local") else p).isfinite().all() for p in model.parameters()])
    return dist.sum_over_ranks(bad.sum()).item() == 0


def stop_non_finite(cfg, out: Path, model, tokenizer, optimizer, schedule, start: str, step: int, bad: BadSteps):
    """BadSteps' `stop` for GRPO (cfg: train.py's Config): save the weights if they are still good (skipped steps
    left them as they were), and stop with one message. `start`: the model this run's GRPO steps started from."""
    rates = f"--learning_rate (now {cfg.learning_rate})"
    if not bad.weights_broken:
        path = ckpt.save_checkpoint(out, step, model, tokenizer, optimizer, schedule, config_json(cfg),
                                    cfg.keep_checkpoints)
        where = f"the weights from before them are saved in {path}"
    else:                                # they blew up: the last good ones are those saved before
        newest = ckpt.list_checkpoints(out)
        where = (f"the weights themselves give NaN/inf, so they were not saved; the last good ones are in "
                 f"{newest[0] if newest else start + ' (no checkpoint was saved yet)'}")
        if not newest and cfg.sft_steps:           # the warm start may have broken them
            rates += f" or --sft_learning_rate (now {cfg.sft_learning_rate})"
    raise SystemExit(f"aborting: {len(bad.problems)} steps in a row met a non-finite value (skipped); {where}. "
                     f"Try a lower {rates}.")
