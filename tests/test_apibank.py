"""API-Bank scorer: hand-written predictions with known verdicts under the paper's protocol."""
import json
import random

import pytest

from rewards.apibank import parse_calls, score_output, summarize

GOLD = {"name": "ModifyRegistration", "parameters": {"appointment_id": "34567890", "new_appointment_date": "2023-03-26"}}
CALL = json.dumps(GOLD)
PARAMS = json.dumps(GOLD["parameters"])


def block(*lines):
    return "<think>t</think>\n<tool_call>\n" + "\n".join(lines) + "\n</tool_call>\n<response>ok</response>"


CASES = [
    ("exact call", block(CALL), True),
    ("any of several calls", block(json.dumps({"name": "Other", "parameters": {}}), CALL), True),
    ("parameters alone count as a call to the gold name", block(PARAMS), True),
    ("wrong name", block(json.dumps({"name": "CancelRegistration", "parameters": GOLD["parameters"]})), False),
    ("extra parameter", block(json.dumps({"name": GOLD["name"], "parameters": {**GOLD["parameters"], "x": "1"}})), False),
    ("missing parameter", block(json.dumps({"name": GOLD["name"], "parameters": {"appointment_id": "34567890"}})), False),
    ("type-sensitive: 34567890 is not '34567890'",
     block(json.dumps({"name": GOLD["name"], "parameters": {**GOLD["parameters"], "appointment_id": 34567890}})), False),
    ("case-sensitive value", block(json.dumps({"name": GOLD["name"], "parameters": {**GOLD["parameters"],
                                                                               "new_appointment_date": "2023-03-26 "}})), False),
    ("key order does not matter", block(json.dumps({"parameters": dict(reversed(GOLD["parameters"].items())),
                                                    "name": GOLD["name"]})), True),
    ("a line that is not JSON is skipped", block("{not json", "", CALL), True),
    ("no <tool_call>: the whole output is read", CALL, True),
    ("no <tool_call>, prose around the call", "Sure! " + CALL, False),
    ("unclosed block", "<tool_call>\n" + CALL, True),
    # the block is str.strip()ped as in the reference, which also drops Unicode spaces json rejects
    ("Unicode spaces around the block are stripped", "<tool_call>\u3000" + CALL + "\u2028</tool_call>", True),
    ("only the last block counts", block(CALL) + "\n<tool_call>\n{}\n</tool_call>", False),
    ("two calls on one line do not parse", block(CALL + " " + CALL), False),
    ("a dict with name only is taken as parameters", block(json.dumps({"name": GOLD["name"]})), False),
    ("'arguments' instead of 'parameters' is taken as parameters",
     block(json.dumps({"name": GOLD["name"], "arguments": GOLD["parameters"]})), False),
    # as the reference scorer: a value it cannot use ends the search
    ("a bare number before the call", block("5", CALL), False),
    ("null before the call", block("null", CALL), False),
    ("a JSON string holding a call is decoded again", block(json.dumps(CALL)), True),
    ("a JSON string that is not JSON ends the search", block('"hello"', CALL), False),
    ("a list is taken as parameters, no match, the search goes on", block("[1, 2]", CALL), True),
    ("empty output", "", False),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_verdicts(text, expected):
    assert score_output(text, GOLD)["correct"] is expected


def test_gold_as_one_element_list():
    # levels 1 and 3 store the answer as [call], level 2 as call
    assert score_output(block(CALL), [GOLD])["correct"]


def test_parse_calls_last_block_one_value_per_line():
    assert parse_calls("<tool_call>\n1\n</tool_call><tool_call>\n{\"a\": 1}\n\n[2]\nnope\n</tool_call>") == [{"a": 1}, [2]]


def test_summary_pools_levels():
    s = summarize({1: (2, 4), 2: (1, 1), 3: (0, 5)})
    assert s == {"level_1": 0.5, "level_2": 1.0, "level_3": 0.0, "overall": 3 / 10}


def test_never_crashes_on_garbage():
    rng = random.Random(0)
    pieces = ["<tool_call>", "</tool_call>", "\n", "{", "}", '"name"', '"parameters"', ":", ",", "[", "]",
              "null", "1e999", '"x"', " ", "9" * 5000, "[" * 3000, CALL, PARAMS]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))
        assert isinstance(score_output(text, GOLD)["correct"], bool)


def test_real_gold_answers_score_as_correct(shared_data):
    # every gold call, written the way the training format asks, must score as correct
    for level in (1, 2, 3):
        rows = json.loads((shared_data / "apibank" / f"level-{level}-api_processed.json").read_text())
        for row in rows:
            gold = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
            assert score_output(block(json.dumps(gold)), row["answer"])["correct"]
