"""BFCL's single-turn scorer: the ToolRL handler's decoder and BFCL's AST checker.

Re-implemented from the published rules of the Berkeley Function Calling Leaderboard
(`bfcl_eval/eval_checker/ast_eval/ast_checker.py`, `eval_runner.py`, `eval_runner_helper.py` in
ShishirPatil/gorilla), so that a model's BFCL numbers can be computed without BFCL's long list of
API-client dependencies. Verdicts follow the official checker case by case, quirks included
(see the comments marked "as BFCL"); the README reports the agreement measured against it.

Pipeline for one model output:
  1. `decode_calls` (the ToolRL paper's BFCL handler): take the text after the LAST `<tool_call>`
     up to the next `</tool_call>`, one JSON object per line; a line that does not parse, lacks
     `name`/`parameters`, or calls the function 'None' is dropped. Each call becomes
     `{name: parameters}`. No `<tool_call>` at all means no call.
  2. `is_call_list`: every call's parameters must be a dict, otherwise the whole output is
     malformed (an AST failure; "no call" for relevance).
  3. `check_ast` for the AST categories, `makes_call` for relevance / irrelevance.

Function names are compared as written: BFCL only rewrites '.' to '_' for API models whose
function-calling endpoints reject dots, and the ToolRL handler is a prompting model that sees and
writes the dotted names.
"""
import json
import re

# BFCL's type names -> the Python type a JSON value must have. "any" is checked as a string.
PYTHON_TYPES = {"string": str, "integer": int, "float": float, "boolean": bool,
                "array": list, "tuple": list, "dict": dict, "any": str}
NESTED_TYPES = ("array", "tuple")  # element types are checked one level deep, as BFCL does

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
                  "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
RELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance", "live_relevance")


# ---------------------------------------------------------------- decoding (ToolRL handler)

def decode_calls(text: str) -> list[dict]:
    """Model output -> [{name: parameters}, ...] from the last `<tool_call>` block; never raises."""
    if "<tool_call>" not in text:
        return []
    block = text.split("<tool_call>")[-1].split("</tool_call>")[0].strip()
    calls = []
    for line in block.split("\n"):
        try:
            obj = json.loads(line)
            name, parameters = obj["name"], obj["parameters"]
            if name.strip().lower() == "none":  # the prompt allows "call the tool 'None'" = no call
                continue
        except Exception:  # any malformed line is skipped, as the handler's bare `except` does
            continue
        calls.append({name: parameters})
    return calls


def is_call_list(calls: list) -> bool:
    """BFCL's format check: a list of one-key dicts whose value (the parameters) is a dict."""
    return isinstance(calls, list) and all(
        type(c) is dict and len(c) == 1 and type(next(iter(c.values()))) is dict for c in calls)


def makes_call(calls: list) -> bool:
    """True when the output contains at least one call and all its calls are well formed."""
    return is_call_list(calls) and len(calls) > 0


# ---------------------------------------------------------------- value comparison

def standardize(s: str) -> str:
    """BFCL's string normalisation: drop spaces and ,./-_*^, lowercase, ' -> "."""
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def _std(x):
    return standardize(x) if type(x) is str else x


def _first_answer_type(possible: list):
    """Type of the first possible answer that is not "" (the "optional" marker), or None."""
    for answer in possible:
        if answer != "":
            return type(answer)
    return None


def _type_error(value, possible: list, expected: type, nested: type | None) -> tuple[str | None, bool]:
    """BFCL's type check -> (error or None, is_variable).

    A value whose type differs from the declared one is still accepted when it has the type of
    the possible answers ("is_variable": BFCL stores variable names as strings); it is then
    compared by plain equality. Lists are checked one level deep against each possible answer.
    """
    answer_type = _first_answer_type(possible)
    is_variable = answer_type is not None and answer_type is not expected
    if type(value) is expected:
        if nested is None:
            return None, is_variable
        for answer in possible:
            # as BFCL: an answer that is not a list ("" for optional) accepts any elements
            if type(answer) is not list or all(
                    _type_error(item, answer, nested, None)[0] is None for item in value):
                return None, is_variable
        return f"wrong element type in {value!r}", is_variable
    if answer_type is not None and type(value) is answer_type:
        return None, True
    return f"expected {expected.__name__}, got {type(value).__name__} {value!r}", is_variable


def _dict_ok(value: dict, possible: list) -> bool:
    """Every key known and its value among the answers; every key not optional present."""
    for answer in possible:
        if type(answer) is not dict:  # "" marks the parameter optional; it matches no value
            continue
        if all(key in answer and _std(v) in [_std(a) for a in answer[key]]
               for key, v in value.items()) and all(
                key in value or "" in options for key, options in answer.items()):
            return True
    return False


def _list_of_dicts_ok(value: list, possible: list) -> bool:
    """Element i must match dict i of one possible answer (order matters, as in BFCL)."""
    # as BFCL: an optional marker "" has length 0, so an empty list matches it
    return any(isinstance(answer, (list, str)) and len(value) == len(answer) and all(
        type(v) is dict and _dict_ok(v, [a]) for v, a in zip(value, answer)) for answer in possible)


def _list_ok(value: list, possible: list) -> bool:
    """Top-level string elements normalised; the list must equal one possible answer."""
    # as BFCL: an optional marker "" becomes [] here, so an empty list matches it
    return [_std(v) for v in value] in [
        [_std(a) for a in answer] for answer in possible if isinstance(answer, (list, str))]


def _value_error(param: str, value, possible: list, spec: dict) -> str | None:
    """Type then value check of one parameter against its possible answers."""
    declared = spec["type"]
    expected = PYTHON_TYPES[declared]
    nested = PYTHON_TYPES[spec["items"]["type"]] if declared in NESTED_TYPES else None
    if declared == "float" and type(value) is int:  # Python's int -> float promotion is accepted
        value = float(value)
    error, is_variable = _type_error(value, possible, expected, nested)
    if error:
        return f"{param}: {error}"
    if is_variable:
        ok = value in possible
    elif expected is dict:
        ok = _dict_ok(value, possible)
    elif expected is list and nested is dict:
        ok = _list_of_dicts_ok(value, possible)
    elif expected is str:
        ok = standardize(value) in [standardize(a) for a in possible if type(a) is str]
    elif expected is list:
        ok = _list_ok(value, possible)
    else:  # int, float, bool: plain equality
        ok = value in possible
    return None if ok else f"{param}: {value!r} not among {possible!r}"


# ---------------------------------------------------------------- call-level checks

def _call_error(function: dict, call: dict, answer: dict) -> str | None:
    """One call {name: params} against one function doc and one answer {name: {param: [values]}}."""
    if function is None:  # the expected function is not in the doc list: a data error, not the model's
        return "expected function not among the documented functions"
    name = function["name"]
    if name not in call:
        return f"wrong function: expected {name}, got {next(iter(call))}"
    params, possible = call[name], next(iter(answer.values()))
    properties, required = function["parameters"]["properties"], function["parameters"].get("required", [])
    missing = [p for p in required if p not in params]
    if missing:
        return f"missing required parameter {missing[0]}"
    for param, value in params.items():
        if param not in properties or param not in possible:
            return f"unexpected parameter {param}"
        error = _value_error(param, value, possible[param], properties[param])
        if error:
            return error
    for param, options in possible.items():
        if param not in params and "" not in options:
            return f"missing parameter {param} (not optional)"
    return None


def _function_doc(functions: list[dict], name: str) -> dict:
    return next((f for f in functions if f["name"] == name), None)


def _parallel_error(functions: list[dict], calls: list[dict], answers: list[dict]) -> str | None:
    """Calls matched to answers in any order: each answer, in turn, takes the first unused call
    that passes (greedy, as BFCL; not a maximum matching)."""
    used = set()
    for answer in answers:
        function = _function_doc(functions, next(iter(answer)))
        match = next((i for i, call in enumerate(calls)
                      if i not in used and _call_error(function, call, answer) is None), None)
        if match is None:
            return f"no call matches {answer}"
        used.add(match)
    return None


def check_ast(category: str, functions: list[dict], calls: list[dict], answers: list[dict]) -> str | None:
    """BFCL AST verdict for one item: None when correct, else the reason it is wrong."""
    if not is_call_list(calls):
        return "malformed call: parameters are not a JSON object"
    expected = len(answers) if "parallel" in category or "multiple" in category else 1
    if len(calls) != expected:
        return f"wrong number of calls: {len(calls)} instead of {expected}"
    if "parallel" in category:
        return _parallel_error(functions, calls, answers)
    if "multiple" in category:  # one call, checked against the doc of the expected function
        return _call_error(_function_doc(functions, next(iter(answers[0]))), calls[0], answers[0])
    return _call_error(functions[0], calls[0], answers[0])  # simple: as BFCL, the only function


def score_output(text: str, category: str, functions: list[dict], answers: list[dict] | None) -> dict:
    """One model output -> {"correct", "calls", "error"} for any single-turn category."""
    calls = decode_calls(text)
    if category in RELEVANCE_CATEGORIES:
        wants_call = category == "live_relevance"
        correct = makes_call(calls) == wants_call
        error = None if correct else ("no valid call" if wants_call else "made a call")
    else:
        error = check_ast(category, functions, calls, answers)
        correct = error is None
    return {"correct": correct, "calls": calls, "error": error}


# ---------------------------------------------------------------- leaderboard columns

def summarize(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """{category: (correct, total)} -> accuracy per category and BFCL's summary columns.

    Averaged as the leaderboard does (eval_runner_helper.py of bfcl-eval): non-live AST is the
    unweighted mean of its four categories; live AST is weighted by item count; irrelevance is the
    unweighted mean of irrelevance and live_irrelevance; relevance is live_relevance. The
    leaderboard's non-live "simple" also averages in Java and JavaScript, which this project does
    not run, so here it is simple_python alone. `live_v3` is BFCL v3's Live column (the version the
    paper used): the count-weighted mean over the four live AST categories, live_irrelevance and
    live_relevance. Columns whose categories were not all run are left out.
    """
    acc = {c: n_ok / n for c, (n_ok, n) in counts.items() if n > 0}
    out = dict(acc)

    def has(*cats):
        return all(c in acc for c in cats)

    non_live = AST_CATEGORIES[:4]
    live = AST_CATEGORIES[4:]
    if has(*non_live):
        out["non_live_ast"] = sum(acc[c] for c in non_live) / len(non_live)
    if has(*live):
        out["live_ast"] = sum(counts[c][0] for c in live) / sum(counts[c][1] for c in live)
    live_v3 = live + ("live_irrelevance", "live_relevance")
    if has(*live_v3):
        out["live_v3"] = sum(counts[c][0] for c in live_v3) / sum(counts[c][1] for c in live_v3)
    if has("irrelevance", "live_irrelevance"):
        out["irrelevance_summary"] = (acc["irrelevance"] + acc["live_irrelevance"]) / 2
    if has("live_relevance"):
        out["relevance_summary"] = acc["live_relevance"]
    return out
