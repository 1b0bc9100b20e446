"""BFCL: the handler's decoder, every rule of the AST checker, the summary columns, the data loader.

Verdicts below were worked out by hand from BFCL's rules; the same scorer agreed with the official
checker (bfcl-eval's ast_checker.py) on every one of ~63k synthetic predictions (see README).
"""
import json
import random

import pytest

from data.bfcl import CATEGORIES, NO_CALL_HINT, PYTHON_HINT, category_file, load_category
from rewards.bfcl import decode_calls, makes_call, score_output, standardize, summarize

AREA = {"name": "geo.area", "description": "Area of a shape.", "parameters": {
    "type": "dict", "required": ["base", "height"], "properties": {
        "base": {"type": "integer", "description": "b"},
        "height": {"type": "float", "description": "h"},
        "unit": {"type": "string", "description": "u"},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "t"},
        "point": {"type": "tuple", "items": {"type": "float"}, "description": "p"},
        "opts": {"type": "dict", "description": "o"},
        "rows": {"type": "array", "items": {"type": "dict"}, "description": "r"},
        "exact": {"type": "boolean", "description": "e"},
        "ref": {"type": "any", "description": "a"}}}}
AREA_ANSWER = {"geo.area": {
    "base": [10], "height": [5.0], "unit": ["square meters", ""], "tags": [["Red", "blue"], ""],
    "point": [[1.5, 2.0], ""], "opts": [{"mode": ["fast"], "seed": [1, ""]}, ""],
    "rows": [[{"k": ["a"]}, {"k": ["b"]}], ""], "exact": [True, ""], "ref": ["x", ""]}}
WEATHER = {"name": "weather", "description": "Weather.", "parameters": {
    "type": "dict", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "c"}, "days": {"type": "integer", "description": "d"}}}}


def out(*calls, tail="</tool_call>"):
    lines = "\n".join(c if isinstance(c, str) else json.dumps(c) for c in calls)
    return f"<think>t</think>\n<tool_call>\n{lines}\n{tail}"


def area(**params):
    return {"name": "geo.area", "parameters": {"base": 10, "height": 5.0, **params}}


def simple(text):
    return score_output(text, "simple_python", [AREA], [AREA_ANSWER])["correct"]


SIMPLE_CASES = [
    # name, required and unknown parameters
    ("exact gold", out(area()), True),
    ("dotted name written as BFCL's API models do", out({"name": "geo_area", "parameters": {"base": 10, "height": 5.0}}), False),
    ("missing required height", out({"name": "geo.area", "parameters": {"base": 10}}), False),
    ("unknown parameter", out(area(colour="red")), False),
    ("two calls in a simple category", out(area(), area()), False),
    ("no call", "<think>t</think>\n<response>no</response>", False),
    # types
    ("int accepted where float expected", out(area(height=5)), True),
    ("float not accepted where int expected", out(area(base=10.0)), False),
    ("numeric string not accepted for an int", out(area(base="10")), False),
    ("bool is not an int", out({"name": "geo.area", "parameters": {"base": True, "height": 5.0}}), False),
    ("bool value", out(area(exact=True)), True),
    ("int for a bool", out(area(exact=1)), False),
    ("'any' is checked as a string", out(area(ref="x")), True),
    # optional parameters: may be omitted only when "" is among the answers
    ("optional given with a listed value", out(area(unit="square meters")), True),
    ("optional given with an unlisted value", out(area(unit="acres")), False),
    # strings: BFCL's normalisation (case, spaces and ,./-_*^ ignored)
    ("string case and spaces", out(area(unit="Square_Meters")), True),
    ("string with other punctuation", out(area(unit="square meters!")), False),
    # lists: elements type-checked, top-level strings normalised, order matters
    ("list equal after normalisation", out(area(tags=["red", "BLUE"])), True),
    ("list in another order", out(area(tags=["blue", "Red"])), False),
    ("list with a wrong element type", out(area(tags=["Red", 2])), False),
    ("tuple given as a JSON list", out(area(point=[1.5, 2.0])), True),
    # as BFCL: when "" (optional) is among the answers, list elements are not type-checked
    ("optional marker skips the element check", out(area(point=[1.5, 2])), True),
    ("empty list matches the optional marker", out(area(tags=[])), True),
    # dicts: keys known, values among the answers, optional keys may be left out
    ("dict with optional key omitted", out(area(opts={"mode": "FAST"})), True),
    ("dict with a listed optional key", out(area(opts={"mode": "fast", "seed": 1})), True),
    ("dict with an unknown key", out(area(opts={"mode": "fast", "x": 1})), False),
    ("dict missing a required key", out(area(opts={"seed": 1})), False),
    ("list of dicts in order", out(area(rows=[{"k": "a"}, {"k": "b"}])), True),
    ("list of dicts reordered", out(area(rows=[{"k": "b"}, {"k": "a"}])), False),
    # decoding: last block, one JSON object per line, malformed lines skipped
    ("malformed line skipped", out("{oops", area()), True),
    ("call without parameters key dropped", out({"name": "geo.area", "arguments": {}}, area()), True),
    ("the 'None' tool is no call", out({"name": "None", "parameters": {}}, area()), True),
    ("unclosed block still read", f"<tool_call>\n{json.dumps(area())}", True),
    ("only the last block counts", out(area()) + "\n<tool_call>\n</tool_call>", False),
    ("parameters not an object: malformed output", out(area(), {"name": "geo.area", "parameters": [1]}), False),
    ("no <tool_call> tag at all", json.dumps(area()), False),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in SIMPLE_CASES], ids=[c[0] for c in SIMPLE_CASES])
def test_simple_rules(text, expected):
    assert simple(text) is expected


def test_no_int_promotion_inside_lists():
    answer = {"geo.area": {"base": [10], "height": [5.0], "point": [[1.5, 2.0]]}}
    def verdict(point):
        text = out(area(point=point))
        return score_output(text, "simple_python", [AREA], [answer])["correct"]
    assert verdict([1.5, 2.0]) and not verdict([1.5, 2])


def test_variable_names_accepted_when_the_answers_are_strings():
    # BFCL stores variable references as strings: a string for an int parameter then counts as a
    # variable and is compared as is ("is_variable" in ast_checker.py).
    answer = {"geo.area": {"base": ["b"], "height": [5.0]}}
    assert score_output(out({"name": "geo.area", "parameters": {"base": "b", "height": 5.0}}),
                        "simple_python", [AREA], [answer])["correct"]
    assert not score_output(out(area()), "simple_python", [AREA], [answer])["correct"]


MULTIPLE_ANSWER = [{"weather": {"city": ["Paris"], "days": [3, ""]}}]


@pytest.mark.parametrize("calls, expected", [
    ([{"name": "weather", "parameters": {"city": "paris"}}], True),  # the doc is found by the gold name
    ([area()], False),  # a documented but wrong function
    ([{"name": "weather", "parameters": {"city": "Paris"}}] * 2, False),  # one call expected
])
def test_multiple(calls, expected):
    assert score_output(out(*calls), "multiple", [AREA, WEATHER], MULTIPLE_ANSWER)["correct"] is expected


PARALLEL_ANSWER = [{"weather": {"city": ["Paris"], "days": [3, ""]}},
                   {"weather": {"city": ["Rome"], "days": [3, ""]}},
                   {"geo.area": AREA_ANSWER["geo.area"]}]
PARIS = {"name": "weather", "parameters": {"city": "Paris"}}
ROME = {"name": "weather", "parameters": {"city": "Rome", "days": 3}}


@pytest.mark.parametrize("calls, expected", [
    ([PARIS, ROME, area()], True),
    ([area(), ROME, PARIS], True),  # any order
    ([PARIS, ROME], False),  # one missing
    ([PARIS, ROME, area(), PARIS], False),  # one extra
    ([PARIS, PARIS, area()], False),  # a call cannot match two answers
])
def test_parallel_any_order(calls, expected):
    for category in ("parallel", "parallel_multiple", "live_parallel", "live_parallel_multiple"):
        assert score_output(out(*calls), category, [WEATHER, AREA], PARALLEL_ANSWER)["correct"] is expected


@pytest.mark.parametrize("text, calls_made", [
    (out(PARIS), True),
    ("I cannot help with that.", False),
    ("<tool_call>\n</tool_call>", False),
    (out({"name": "None", "parameters": {}}), False),  # the handler's "no tool" call
    (out(PARIS, {"name": "weather", "parameters": "Paris"}), False),  # malformed: counts as no call
    (json.dumps(PARIS), False),  # no tag: the handler reads nothing
])
def test_relevance_and_irrelevance(text, calls_made):
    assert makes_call(decode_calls(text)) is calls_made
    for category in ("irrelevance", "live_irrelevance"):
        assert score_output(text, category, [WEATHER], None)["correct"] is not calls_made
    assert score_output(text, "live_relevance", [WEATHER], None)["correct"] is calls_made


def test_standardize():
    assert standardize("April 1, 2024") == standardize("april 1,2024") == "april12024"
    assert standardize("it's") == 'it"s'


def test_summary_columns_average_as_the_leaderboard():
    counts = {"simple_python": (1, 2), "multiple": (1, 1), "parallel": (0, 1), "parallel_multiple": (1, 4),
              "live_simple": (1, 1), "live_multiple": (2, 4), "live_parallel": (0, 3), "live_parallel_multiple": (1, 2),
              "irrelevance": (1, 1), "live_irrelevance": (1, 4), "live_relevance": (2, 4)}
    s = summarize(counts)
    assert s["non_live_ast"] == pytest.approx((0.5 + 1 + 0 + 0.25) / 4)  # unweighted
    assert s["live_ast"] == pytest.approx((1 + 2 + 0 + 1) / (1 + 4 + 3 + 2))  # weighted by count
    assert s["irrelevance_summary"] == pytest.approx((1 + 0.25) / 2)  # unweighted
    assert s["relevance_summary"] == 0.5
    assert s["live_v3"] == pytest.approx((1 + 2 + 0 + 1 + 1 + 2) / (1 + 4 + 3 + 2 + 4 + 4))  # v3: with (ir)relevance
    assert "live_ast" not in summarize({"live_simple": (1, 1)})  # a partial group gets no column


def test_decoding_never_crashes_on_garbage():
    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", "\n", "{", "}", '"name"', '"parameters"', ":", ",", "[", "]",
              "null", "1e999", "None", '"geo.area"', " ", "9" * 5000, "[" * 3000]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for category in CATEGORIES:
            answers = None if "relevance" in category else [AREA_ANSWER]
            assert isinstance(score_output(text, category, [AREA], answers)["correct"], bool)


# ---- data loader, on a small fixture in BFCL's file layout ------------------------------------------

def write_fixture(folder):
    (folder / "possible_answer").mkdir(parents=True)
    entry = {"id": "parallel_0", "question": [[{"role": "system", "content": "dropped"},
                                               {"role": "user", "content": " Weather in Paris and Rome? "}]],
             "function": [WEATHER]}
    (folder / "BFCL_v4_parallel.json").write_text(json.dumps(entry) + "\n")
    (folder / "BFCL_v4_live_parallel.json").write_text("")  # must not be mistaken for "parallel"
    (folder / "possible_answer" / "BFCL_v4_parallel.json").write_text(
        json.dumps({"id": "parallel_0", "ground_truth": PARALLEL_ANSWER[:2]}) + "\n")
    (folder / "BFCL_v3_simple.json").write_text("")  # v3's name for simple_python


def test_loader_builds_the_handler_prompt(tmp_path):
    write_fixture(tmp_path)
    [item] = load_category("parallel", tmp_path)
    system, user = item.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert ("1. Name: weather\nDescription: Weather." + PYTHON_HINT
            + '\nParameters: {"city": {"type": "string", "description": "c"}, '
              '"days": {"type": "integer", "description": "d"}}') in system["content"]
    assert user["content"] == f"**Dialogue Records History**\n<user> Weather in Paris and Rome?\n{NO_CALL_HINT} </user>"
    assert item.answers == PARALLEL_ANSWER[:2] and item.functions == [WEATHER]
    assert category_file(tmp_path, "simple_python").name == "BFCL_v3_simple.json"
