"""`--reward_fn module:function`: train on your own reward instead of ToolRL's (the default).

The function takes and returns what `toolrl_reward` does:

    fn(completion: str, ground_truth: str, step: int, config: RewardConfig) -> {"total": float, <term>: float, ...}

GRPO trains on "total"; train.py logs the batch mean of every other key as `rewards/<term>`. `step` is the 0-based
GRPO step (for schedules), `config` holds the --reward_* flags (ignore it if you have no variants).

A reward that raises stops the run, naming the function and the completion: it is a bug to fix, and skipping the
completion (or scoring it 0) would silently train on a different reward. A non-finite total is reported the same
way but does not stop the run here: it makes its group's advantages NaN, and train.py's non-finite guard skips
the optimizer steps that hold them (and aborts after --max_bad_steps in a row).
"""
import importlib
import math
import numbers
from typing import Callable

DEFAULT = "rewards.toolrl:toolrl_reward"


class RewardError(RuntimeError):
    """The reward function raised, or returned something other than a dict with "total"."""


def load_reward_fn(path: str) -> Callable:
    """"package.module:function" -> the function; ValueError with a one-line reason when it cannot be had."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ValueError(f"--reward_fn {path!r}: expected module:function, e.g. {DEFAULT}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:         # the module, or something it imports, is missing
        raise ValueError(f"--reward_fn {path!r}: cannot import {module_name} ({e})") from e
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"--reward_fn {path!r}: module {module_name} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"--reward_fn {path!r}: {name} is a {type(fn).__name__}, not a function")
    return fn


def score_completions(fn: Callable, completions: list[str], truths: list[str], step: int, config) -> list[dict]:
    """fn on every (completion, ground truth) -> one dict per completion; RewardError naming the function and the
    completion's index when fn raises or returns no "total"; a printed warning for non-finite totals."""
    name = f"{fn.__module__}:{fn.__qualname__}"
    scores = []
    for i, (completion, truth) in enumerate(zip(completions, truths)):
        try:
            score = fn(completion, truth, step, config)
        except Exception as e:
            raise RewardError(f"reward {name} raised on completion {i} of {len(completions)} at step {step} "
                              f"({type(e).__name__}: {e}); completion: {completion[:200]!r}") from e
        if not isinstance(score, dict) or not isinstance(score.get("total"), numbers.Real):
            raise RewardError(f"reward {name} returned {type(score).__name__} {str(score)[:100]} for completion {i}; "
                              f"expected a dict with a number 'total' (and any named terms), as toolrl_reward returns")
        scores.append(score)
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s["total"])]
    if bad:
        print(f"warning: reward {name} returned a non-finite total ({scores[bad[0]]['total']}) for completion(s) "
              f"{bad[:10]} of {len(scores)} at step {step}; the optimizer steps that hold them are skipped")
    return scores


def reward_terms(scores: list[dict]) -> dict[str, float]:
    """{"rewards/<term>": mean over the completions that have it}, every key but "total", in first-seen order."""
    terms = list(dict.fromkeys(k for s in scores for k in s if k != "total"))
    return {f"rewards/{k}": sum(s[k] for s in scores if k in s) / sum(k in s for s in scores) for k in terms}
