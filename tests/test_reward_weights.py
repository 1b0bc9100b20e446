"""--reward_weights (rewards/custom.py): parsing, the weighted total against hand arithmetic and a loop, the
unweighted default bit for bit, and the one-line errors."""
import json
import random

import pytest

from rewards import RewardConfig, toolrl_reward
from rewards.custom import TOOLRL_TERMS, parse_reward_weights, reward_terms, weighted_total

GT = '<think> t </think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1, "b": "x"}}\n</tool_call>'
COMPLETIONS = [
    GT,                                                                                # exact: format 1, correctness 3
    '<think> a b c </think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>',   # partial credit
    '<tool_call>\n{"name": "g", "parameters": {}}\n</tool_call>',                      # bad format, wrong call
    "no tags at all",
    "<think>" + " word" * 300 + '</think>\n<tool_call>\n{"name": "f", "parameters": {"b": "x"}}\n</tool_call>',
]
CONFIGS = [RewardConfig(), RewardConfig(length="fixed"), RewardConfig(length="dynamic", scale="dynamic"),
           RewardConfig(scale="two_stage", granularity="finegrained")]


def scores():
    return [toolrl_reward(c, GT, step, config) for c in COMPLETIONS for config in CONFIGS for step in (0, 40, 104)]


def test_toolrl_terms_are_toolrl_rewards_keys_in_order():
    assert TOOLRL_TERMS == tuple(k for k in toolrl_reward(GT, GT) if k != "total")


def test_no_weights_is_todays_total_bit_for_bit():
    for score in scores():
        assert weighted_total(score, None) is score["total"]
        assert weighted_total(score, parse_reward_weights("")) is score["total"]


def test_unit_weights_give_the_same_total_bit_for_bit():
    # toolrl's total is format + correctness + length, summed in that order; so is the weighted sum with weights 1.
    for text in ("1,1,1", "1,1", "format=1", "length=1,correctness=1"):
        weights = parse_reward_weights(text)
        for score in scores():
            assert weighted_total(score, weights) == score["total"], (text, score)


def test_weighted_total_by_hand():
    # format 1, correctness 3 (exact match), length 0: 0.5 * 1 + 2 * 3 + 1 * 0 = 6.5
    score = toolrl_reward(GT, GT)
    assert (score["format"], score["correctness"], score["length"]) == (1.0, 3.0, 0.0)
    for text in ("0.5,2", "0.5,2,1", "format=0.5,correctness=2", " correctness = 2 , format = 0.5 "):
        assert weighted_total(score, parse_reward_weights(text)) == 6.5, text
    # length counts when chosen: 300 words / 512 = 0.59 (rounded); weights 0,0,10 keep only it: 5.9
    long = toolrl_reward(COMPLETIONS[4], GT, 0, RewardConfig(length="fixed"))
    assert long["length"] == 0.59
    assert weighted_total(long, parse_reward_weights("0,0,10")) == pytest.approx(5.9, abs=1e-12)


def test_weighted_total_against_a_loop():
    rng = random.Random(0)
    for _ in range(200):
        weights = {name: rng.uniform(-3, 3) for name in TOOLRL_TERMS if rng.random() < 0.7}
        text = ",".join(f"{k}={v!r}" for k, v in weights.items())
        score = rng.choice(scores())
        expected = 0.0
        for name in TOOLRL_TERMS:                     # a term given no weight weighs 1
            expected += weights.get(name, 1.0) * score[name]
        assert weighted_total(score, parse_reward_weights(text)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_logged_terms_stay_unweighted():
    batch = scores()
    before = json.dumps(reward_terms(batch))
    weights = parse_reward_weights("0.5,2,3")
    totals = [weighted_total(s, weights) for s in batch]
    assert json.dumps(reward_terms(batch)) == before
    assert totals != [s["total"] for s in batch]


def test_custom_reward_terms_by_name():
    score = {"total": 3.0, "accuracy": 2.0, "style": 1.0}
    weights = parse_reward_weights("style=4", term_names=None)
    assert weighted_total(score, weights) == 6.0                  # 2 * 1 + 1 * 4
    with pytest.raises(ValueError, match="no term 'speed'"):
        weighted_total(score, parse_reward_weights("speed=2", term_names=None))
    # a total that is not the sum of its terms (a logged diagnostic): weighing the terms would change the reward
    with pytest.raises(ValueError, match="total is the sum of its terms"):
        weighted_total({"total": 1.0, "style": 1.0, "seconds": 12.0}, weights)
    nan = {"total": float("nan"), "accuracy": 2.0, "style": 1.0}
    assert weighted_total(nan, weights) is nan["total"]           # goes on to the non-finite guard as it is


@pytest.mark.parametrize("text, words", [
    ("1,x", "'x' is not a number"),
    ("format=1,2", "by position or all by name"),
    ("1,2,3,4", "4 weights for 3 terms"),
    ("speed=1", "unknown term 'speed'"),
    ("=1", "unknown term ''"),
    ("format=1,format=2", "'format' is given twice"),
    ("nan,1", "not a finite number"),
    ("1,inf", "not a finite number"),
])
def test_bad_weights_fail_in_one_line_naming_the_flag(text, words):
    with pytest.raises(ValueError) as e:
        parse_reward_weights(text)
    message = str(e.value)
    assert message.startswith(f"--reward_weights {text!r}") and words in message and "\n" not in message


def test_positional_weights_need_known_terms():
    with pytest.raises(ValueError, match="name them"):
        parse_reward_weights("1,2", term_names=None)
