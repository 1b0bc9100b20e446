"""API-Bank scorer, the protocol of the ToolRL paper's Table 2 (Qian et al. 2025).

Follows the paper's released API-Bank scripts (generation parser and soft-match scorer), so that
numbers are comparable with the paper's: an item is correct when ANY call parsed from the output
has the gold name and exactly the gold parameter dict.

Parsing: the text after the LAST `<tool_call>` (the whole output when there is none), up to the
next `</tool_call>`; one JSON value per non-blank line; lines that do not parse are skipped.

Matching, as the paper's scorer does it:
  - a parsed dict without both `name` and `parameters` counts as the parameters of a call to the
    gold function (models often write the arguments alone);
  - parameters are compared with Python's `==`: types matter between strings and numbers
    ("1" != 1), while 1 == 1.0 == True would count as equal. Every gold value in the released data
    is a string, so in practice this is an exact, type-sensitive match;
  - the scorer stops at the first value it cannot use as a call (a bare number or null, a JSON
    string that is not itself JSON): in the reference, `"name" in 5` raises and ends the loop, so a
    call written after such a line is never seen.
"""
import json

LEVELS = (1, 2, 3)  # 399 / 67 / 131 items; overall accuracy = correct / 597


def parse_calls(text: str) -> list:
    """Model output -> the JSON values on the lines of its last `<tool_call>` block; never raises."""
    # stripped as the reference does: str.strip() also removes Unicode spaces (\u3000, \x85, ...)
    # that json.loads rejects, so a call right after the tag must not be lost to them
    block = text.split("<tool_call>")[-1].split("</tool_call>")[0].strip()
    calls = []
    for line in block.split("\n"):
        if not line.strip():
            continue
        try:
            calls.append(json.loads(line))
        except Exception:  # bad JSON, huge ints, nesting too deep: skip the line
            continue
    return calls


def _as_call(value, gold_name: str) -> tuple:
    """One parsed value -> (name, parameters); raises where the reference scorer raises."""
    if isinstance(value, str):  # the reference decodes strings once more
        value = json.loads(value)
    if not isinstance(value, (dict, list, str)):  # `"name" in 5` raises in the reference
        raise TypeError(f"not a call: {value!r}")
    if "name" not in value or "parameters" not in value:
        return gold_name, value
    return value["name"], value["parameters"]  # raises for a list or str holding both words


def is_correct(calls: list, gold: dict) -> bool:
    """True when a parsed call has the gold name and exactly the gold parameters."""
    for value in calls:
        try:
            name, parameters = _as_call(value, gold["name"])
        except Exception:  # as the reference: an unusable value ends the search
            return False
        if name == gold["name"] and parameters == gold["parameters"]:
            return True
    return False


def score_output(text: str, gold: dict | list) -> dict:
    """One model output -> {"correct", "calls"}; `gold` is {"name", "parameters"} or, as in the
    level 1 and 3 files, a one-element list of it."""
    if isinstance(gold, list):
        gold = gold[0]
    calls = parse_calls(text)
    return {"correct": is_correct(calls, gold), "calls": calls}


def summarize(counts: dict[int, tuple[int, int]]) -> dict[str, float]:
    """{level: (correct, total)} -> accuracy per level and overall (pooled over all items)."""
    out = {f"level_{level}": ok / n for level, (ok, n) in counts.items() if n > 0}
    n_total = sum(n for _, n in counts.values())
    if n_total:
        out["overall"] = sum(ok for ok, _ in counts.values()) / n_total
    return out
