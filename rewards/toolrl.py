"""The ToolRL reward: format + correctness (+ length), with every section-5 variant.

Follows Qian et al. 2025, "ToolRL: Reward is All Tool Learning Needs" (arXiv 2504.13958), and gives
the same number as the authors' released scorer (`verl/utils/reward_score/rlla.py` in
github.com/qiancheng0/ToolRL) for every completion. Where the paper's text and that code differ, this
module follows the code; the differences are listed at the end.

    total = format + correctness + length

format       the scale's maximum when the completion is laid out as the ground truth is, else its
             minimum: `<think>...</think>`, then `<tool_call>\\n...\\n</tool_call>` and/or
             `<response>...</response>` as in the ground truth, nothing around them. Default {0, 1}.
correctness  how well the predicted calls P match the gold calls G, each call a JSON object
             {"name": ..., "parameters": {...}} on its own line. Default [-3, 3]; 0 when the ground
             truth makes no call.
length       words in the last <think> block / a target, rounded to 2 decimals, capped at 1.
             0 unless a length variant is chosen.

Correctness for the range [lo, hi]:

    P == G (parsed JSON)    ->  hi
    otherwise               ->  (hi - lo) * score / S + lo
      score   = J(names of G, names of P) + sum over g in G, in order, of best(g)
      S       = 1 + sum over g in G of (1 + number of parameters of g)
      best(g) = max over the not-yet-used p in P with g's name of
                J(parameter keys of g, of p) + number of g's parameters that p gives an equal value
                (Python ==, so "1" != 1); counted, and p marked used, only when > 0
      J(a, b) = |a & b| / (|a| + |b| - |a & b|) as multisets; 1 when a == b, 0 when one is empty

A prediction that cannot be read scores lo: no <tool_call> or no </tool_call>, a line of the block
that is not JSON, a call that is not an object with a "name", and, where parameters are compared,
a same-name call whose "parameters" is not an object.

Variants, one field of RewardConfig per axis of the paper's section 5 (the defaults are its reward):

    length       none          no length term
                 fixed         target 512 words
                 dynamic       target 384 + (640 - 384) * step / 105 words
    scale        original      format [0, 1], correctness [-3, 3]
                 equal_max     correctness [-1, 1]
                 two_stage     correctness [-1, 1] while step < 30; format [0, 0.5] from step 30 on
                 dynamic       linear over 150 steps: format max 2 -> 1, correctness [-2, 2] -> [-3, 3],
                               format min -2 -> 0 but held at -1 from step 75 (a bad format costs reward)
    granularity  original      as above
                 finegrained   J is 1 for identical lists (order included), else 0
                 intermediate  best(g) is 1 for the first unused prediction equal to g, else 0;
                               S = 1 + number of gold calls
                 coarse        hi for an exact match, else lo

Where the code (followed here) and the paper's text differ:
- The schedule constants (150 steps for the dynamic scale, the switch at step 30, 105 steps and
  384 -> 640 words for the dynamic length target, 512 words for the fixed one) are the code's; the
  paper's text states its schedules differently, and is not quoted here because we could not check
  its wording. The run the code came with is 105 steps long, so the dynamic scale never finishes its
  150-step ramp (at step 105: format max 1.3, correctness [-2.7, 2.7]).
- The paper's text describes an optimal matching of predicted to gold calls; the code matches
  greedily, one gold call at a time in order, which can pair calls suboptimally when a name repeats.

Quirks of the code, kept: values compare with Python == after json.loads (1 == 1.0 == true, "1" != 1,
key order ignored); the format check counts the <tool_call> and <response> tags but not <think>
(two think blocks pass); the calls are read from the completion's first <tool_call> block even when
the format check fails. One departure: a ground truth whose first block is not JSON (the tag quoted
in its thought) crashes the released code; here it is read from its last block.
"""
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

Range = tuple[float, float]  # (min, max) of one reward term


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class RewardConfig:
    """Which variant of each of the paper's three ablation axes to use (defaults: the paper's reward)."""

    length: str = "none"  # section 5.1, thinking-length term: none | fixed | dynamic
    scale: str = "original"  # section 5.2, ranges over training: original | equal_max | two_stage | dynamic
    granularity: str = "original"  # section 5.3: original | finegrained | intermediate | coarse

    def __post_init__(self):
        for field, table in (("length", LENGTH_TARGETS), ("scale", SCALES), ("granularity", GRANULARITIES)):
            value = getattr(self, field)
            if value not in table:
                raise ValueError(f"RewardConfig.{field} must be one of {sorted(table)}, got {value!r}")


# ---- scale: the (format, correctness) ranges at a training step ----------------------------------

def _ramp(start: float, end: float, step: int) -> float:
    """Linear from `start` at step 0 towards `end` at step 150 (and beyond it: the caller clamps)."""
    return start + (end - start) * step / 150


def _original_scale(step: int) -> tuple[Range, Range]:
    return (0.0, 1.0), (-3.0, 3.0)


def _equal_max_scale(step: int) -> tuple[Range, Range]:
    return (0.0, 1.0), (-1.0, 1.0)


def _two_stage_scale(step: int) -> tuple[Range, Range]:
    # The correctness range spans 2x the format range before step 30, then 12x (6 against 0.5).
    return ((0.0, 1.0), (-1.0, 1.0)) if step < 30 else ((0.0, 0.5), (-3.0, 3.0))


def _dynamic_scale(step: int) -> tuple[Range, Range]:
    format_range = (min(_ramp(-2, 0, step), -1.0), max(_ramp(2, 1, step), 1.0))
    correctness_range = (max(_ramp(-2, -3, step), -3.0), min(_ramp(2, 3, step), 3.0))
    return format_range, correctness_range


SCALES: dict[str, Callable[[int], tuple[Range, Range]]] = {
    "original": _original_scale,
    "equal_max": _equal_max_scale,
    "two_stage": _two_stage_scale,
    "dynamic": _dynamic_scale,
}

# ---- length: the target number of thinking words at a training step (None: no length term) -------

LENGTH_TARGETS: dict[str, Callable[[int], float] | None] = {
    "none": None,
    "fixed": lambda step: 512,
    "dynamic": lambda step: 384 + (640 - 384) * step / 105,
}


# ---- granularity: how a prediction that is not an exact match earns partial credit --------------

def _jaccard(a: list, b: list) -> float:
    """Multiset Jaccard similarity. Like collections.Counter, raises TypeError on unhashable items."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    overlap = sum((Counter(a) & Counter(b)).values())
    return overlap / (len(a) + len(b) - overlap)


def _identical(a: list, b: list) -> float:
    return 1.0 if a == b else 0.0


def _parameter_credit(gold: dict, predicted: dict, similarity: Callable[[list, list], float]) -> float | None:
    """J(keys) + number of equal values; None when the prediction has no parameter object to compare."""
    params = predicted.get("parameters")
    if not isinstance(params, dict):
        return None
    gold_params = gold["parameters"]
    equal_values = sum(1 for key, value in gold_params.items() if key in params and params[key] == value)
    return similarity(list(gold_params), list(params)) + equal_values


def _whole_call_credit(gold: dict, predicted: dict, similarity: Callable[[list, list], float]) -> float:
    return 1.0 if predicted == gold else 0.0


class Granularity(NamedTuple):
    similarity: Callable[[list, list], float]  # J, for the call names and for parameter keys
    call_credit: Callable[[dict, dict, Callable], float | None]  # (gold call, predicted call, J) -> credit;
    #                                                              None: the whole prediction scores lo
    call_weight: Callable[[dict], float]  # a gold call's share of the maximum S


def _parameter_weight(call: dict) -> float:
    return 1.0 + len(call["parameters"])


GRANULARITIES: dict[str, Granularity | None] = {
    "original": Granularity(_jaccard, _parameter_credit, _parameter_weight),
    "finegrained": Granularity(_identical, _parameter_credit, _parameter_weight),
    "intermediate": Granularity(_jaccard, _whole_call_credit, lambda call: 1.0),
    "coarse": None,  # no partial credit: an exact match or nothing
}


# ---- parsing --------------------------------------------------------------------------------------

def _tool_call_block(text: str, last: bool = False) -> str:
    """The text after the first (or last) <tool_call>, up to the next <tool_call> or </tool_call>."""
    after = text.rpartition("<tool_call>")[2] if last else text.partition("<tool_call>")[2]
    return after.partition("<tool_call>")[0].partition("</tool_call>")[0]


def _gold_calls(ground_truth: str) -> list[dict] | None:
    """The ground truth's tool calls; None when it makes none. Raises ValueError if they cannot be read."""
    if "<tool_call>" not in ground_truth:
        return None
    # A ground truth may quote the tag in its thought (17 rows of the ToolRL SFT set do); the released
    # code crashes there. Its real calls are then in the last block.
    for block in (_tool_call_block(ground_truth), _tool_call_block(ground_truth, last=True)):
        try:
            calls = [json.loads(line) for line in block.strip().split("\n")]
            break
        except (ValueError, RecursionError):
            continue
    else:
        raise ValueError(f"ground truth's <tool_call> block is not one JSON object per line: "
                         f"{ground_truth!r}")
    for call in calls:
        readable = isinstance(call, dict) and isinstance(call.get("name"), str)
        if not (readable and isinstance(call.get("parameters"), dict)):
            raise ValueError(f"ground truth call is not {{'name': str, 'parameters': dict}}: {call!r}")
    return calls


# ---- the three terms ------------------------------------------------------------------------------

# (ground truth has <tool_call>, has <response>) -> (layout, tags that must appear exactly once)
FORMATS: dict[tuple[bool, bool], tuple[re.Pattern, tuple[str, ...]]] = {
    (False, True): (re.compile(r"^<think>.*?</think>\n<response>.*?</response>$", re.DOTALL),
                    ("<response>", "</response>")),
    (True, False): (re.compile(r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$", re.DOTALL),
                    ("<tool_call>", "</tool_call>")),
    (True, True): (re.compile(r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$",
                              re.DOTALL),
                   ("<tool_call>", "</tool_call>", "<response>", "</response>")),
    (False, False): (re.compile(r"^<think>.*?</think>$", re.DOTALL), ()),
}


def format_ok(completion: str, ground_truth: str) -> bool:
    """Whether the (stripped) completion has the ground truth's layout."""
    layout, once = FORMATS["<tool_call>" in ground_truth, "<response>" in ground_truth]
    # Counting first gives the same answer (both must hold) and keeps the regex linear on huge inputs.
    return all(completion.count(tag) == 1 for tag in once) and layout.search(completion) is not None


def _partial_credit(gold: list[dict], predicted: list, granularity: Granularity | None,
                    ) -> tuple[float, float] | None:
    """(score, S) for a prediction that is not an exact match; None where the released code scores lo."""
    if granularity is None:
        return None
    if not all(isinstance(call, dict) and "name" in call for call in predicted):
        return None
    try:
        score = granularity.similarity([call["name"] for call in gold], [call["name"] for call in predicted])
    except TypeError:  # a name that is a list or object cannot be counted: the released code scores lo
        return None
    possible = 1.0
    used = set()
    for gold_call in gold:  # greedy, in the gold order (the paper's text describes an optimal matching)
        possible += granularity.call_weight(gold_call)
        best, best_index = 0.0, None
        for i, call in enumerate(predicted):
            if i in used or call["name"] != gold_call["name"]:
                continue
            credit = granularity.call_credit(gold_call, call, granularity.similarity)
            if credit is None:
                return None
            if credit > best:  # strictly: the first of equal candidates wins
                best, best_index = credit, i
        if best_index is not None:
            used.add(best_index)
            score += best  # added one at a time, in this order, to reproduce the code's float rounding
    return score, possible


def correctness(completion: str, gold: list[dict] | None, granularity: Granularity | None,
                bounds: Range) -> float:
    """The correctness term for the stripped completion (see the module docstring)."""
    lo, hi = bounds
    if gold is None:
        return 0.0
    if "<tool_call>" not in completion or "</tool_call>" not in completion:
        return lo
    # Parsed here rather than in a helper: on Python 3.11 json's nesting limit counts the caller's
    # frames, and at the released code's call depth JSON nested right at the limit parses as there.
    try:
        predicted = [json.loads(line) for line in _tool_call_block(completion).strip().split("\n")]
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's recursion limit
        return lo
    if predicted == gold:
        return hi
    credit = _partial_credit(gold, predicted, granularity)
    if credit is None:
        return lo
    score, possible = credit
    return (hi - lo) * score / possible + lo


def length(completion: str, target_words: float) -> float:
    """Words in the last <think> block over the target, rounded to 2 decimals, capped at 1."""
    if "<think>" not in completion or "</think>" not in completion:
        return 0.0
    thought = completion.rpartition("<think>")[2].partition("</think>")[0]
    return min(round(len(thought.split()) / target_words, 2), 1.0)


def toolrl_reward(completion: str, ground_truth: str, step: int = 0,
                  config: RewardConfig = RewardConfig()) -> dict:
    """Score one completion against its ground truth at a training step.

    Returns {"format", "correctness", "length", "total"} as floats, total = format + correctness + length.
    Never raises on the completion; raises ValueError on a ground truth whose calls cannot be read.
    """
    completion = completion.strip()
    (format_lo, format_hi), correctness_range = SCALES[config.scale](step)
    target = LENGTH_TARGETS[config.length]
    terms = {
        "format": format_hi if format_ok(completion, ground_truth) else format_lo,
        "correctness": correctness(completion, _gold_calls(ground_truth), GRANULARITIES[config.granularity],
                                   correctness_range),
        "length": 0.0 if target is None else length(completion, target(step)),
    }
    terms = {name: float(value) for name, value in terms.items()}
    terms["total"] = terms["format"] + terms["correctness"] + terms["length"]
    return terms
