"""`--reward_fn module:function`: train on your own reward instead of ToolRL's (the default).

The function takes and returns what `toolrl_reward` does:

    fn(completion: str, ground_truth: str, step: int, config: RewardConfig) -> {"total": float, <term>: float, ...}

GRPO trains on "total"; train.py logs the batch mean of every other key as `rewards/<term>`. `step` is the 0-based
GRPO step (for schedules), `config` holds the --reward_* flags (ignore it if you have no variants).

A reward that raises stops the run, naming the function and the completion: it is a bug to fix, and skipping the
completion (or scoring it 0) would silently train on a different reward. A non-finite total is reported the same
way but does not stop the run here: it makes its group's advantages NaN, and train.py's non-finite guard skips
the optimizer steps that hold them (and aborts after --max_bad_steps in a row).

`--reward_weights` re-weighs the terms: GRPO then trains on sum_k w_k * term_k (a term given no weight weighs 1), for
a reward whose "total" is the sum of its terms, as toolrl_reward's is. The logged `rewards/<term>` stay unweighted.
"""
import importlib
import math
import numbers
from typing import Callable

DEFAULT = "rewards.toolrl:toolrl_reward"
TOOLRL_TERMS = ("format", "correctness", "length")   # toolrl_reward's terms, in order: --reward_weights 1,2[,0.5]


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


def parse_reward_weights(text: str, term_names: tuple[str, ...] | None = TOOLRL_TERMS) -> dict[str, float] | None:
    """--reward_weights -> {term: weight}; None for "" (the reward's own total).

    "1,2[,0.5]" gives term_names' weights in order (toolrl's: format, correctness, length); "correctness=2,format=1"
    names them (term_names None: any name, checked against the reward's terms when scored). ValueError, one line
    naming the flag and the bad value, for anything else.
    """
    if not text.strip():
        return None
    items = [item.strip() for item in text.split(",")]
    named = ["=" in item for item in items]
    if any(named) and not all(named):
        raise ValueError(f"--reward_weights {text!r}: give all weights by position or all by name, not both")
    if all(named):
        pairs = [tuple(part.strip() for part in item.split("=", 1)) for item in items]
    elif term_names is None:
        raise ValueError(f"--reward_weights {text!r}: this reward's terms are not known in advance; "
                         f"name them, e.g. correctness=2")
    elif len(items) > len(term_names):
        raise ValueError(f"--reward_weights {text!r}: {len(items)} weights for {len(term_names)} terms "
                         f"({','.join(term_names)})")
    else:
        pairs = list(zip(term_names, items))
    weights = {}
    for name, value in pairs:
        if not name or (term_names is not None and name not in term_names):
            raise ValueError(f"--reward_weights {text!r}: unknown term {name!r}"
                             + (f"; the terms are {','.join(term_names)}" if term_names else ""))
        if name in weights:
            raise ValueError(f"--reward_weights {text!r}: term {name!r} is given twice")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"--reward_weights {text!r}: {value!r} is not a number") from None
        if not math.isfinite(weights[name]):
            raise ValueError(f"--reward_weights {text!r}: the weight of {name!r} is {value}, not a finite number")
    return weights


def weighted_total(score: dict, weights: dict[str, float] | None) -> float:
    """The reward GRPO trains on: score["total"] itself when weights is None (bit for bit) or the total is not
    finite, else sum_k weights.get(k, 1) * score[k] over every term k but "total". ValueError when a weight names a
    term the score lacks, or when the score's total is not the sum of its terms (weighing them would change it).
    """
    total = score["total"]
    if weights is None or not math.isfinite(total):   # a NaN/inf total goes on, as it is, to the non-finite guard
        return total
    terms = {k: v for k, v in score.items() if k != "total"}
    missing = sorted(set(weights) - set(terms))
    if missing:
        raise ValueError(f"--reward_weights: the reward has no term {missing[0]!r}; its terms are {','.join(terms)}")
    if not math.isclose(sum(terms.values()), total, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(f"--reward_weights needs a reward whose total is the sum of its terms; this one returns "
                         f"total {total} for terms {terms}")
    return float(sum(weights.get(k, 1.0) * v for k, v in terms.items()))
