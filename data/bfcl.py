"""BFCL's single-turn test sets, prompted the way the ToolRL paper's BFCL handler prompted them.

Data: the JSON Lines files that ship inside the `bfcl-eval` PyPI package (Apache-2.0),
`bfcl_eval/data/BFCL_v*_<category>.json` (one test entry per line: id, question, function) and
`bfcl_eval/data/possible_answer/BFCL_v*_<category>.json` (id, ground_truth). Install the package
with `pip install --no-deps bfcl-eval` (just the data and code, none of its API clients), or point
`bfcl_dir` at a folder with the same layout (e.g. a checkout's `bfcl_eval/data`). The package is
optional: only this module needs it.

Prompt: the paper's handler (`benchmarks/BFCL/rlla_qwen.py` in the ToolRL release) writes the
training system prompt with the functions listed as
    N. Name: <name>\nDescription: <description>\nParameters: <json.dumps of parameters.properties>
and a user turn "**Dialogue Records History**\n<user> {question}\n{NO_CALL_HINT} </user>"; BFCL
adds its Python hint to every description before the handler sees it, and any system message of
the entry is dropped. The handler wrote Qwen's chat markup by hand; here the [system, user]
messages go through the model's own chat template (the same text for Qwen2.5).
"""
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

from rewards.bfcl import AST_CATEGORIES, RELEVANCE_CATEGORIES
from data.jsonl import read_jsonl

CATEGORIES = AST_CATEGORIES + RELEVANCE_CATEGORIES
# File-name stems per category: BFCL v3 called the non-live simple set "simple", v4 "simple_python".
FILE_STEMS = {"simple_python": ("simple_python", "simple")}

PYTHON_HINT = " Note that the provided function is in Python 3 syntax."  # added by BFCL's runner

NO_CALL_HINT = ("If there's no appropriate tools to apply or required parameters are missing, please directly "
                "inform me in your response without any tool call, or call the tool with the name as 'None'. "
                "Otherwise, you should use one or more necessary tool calls to complete the given task in this "
                "turn.")

CALL_EXAMPLE = ('{"name": "Tool name", "parameters": {"Parameter name": "Parameter content", '
                '"... ...": "... ..."}}\n'
                '{"name": "... ...", "parameters": {"... ...": "... ...", "... ...": "... ..."}}')

# The ToolRL training system prompt (the same text as the instruction of every ToolRL example).
SYSTEM_PROMPT = """You are a helpful multi-turn dialogue assistant capable of leveraging tool calls to solve user tasks and provide structured chat responses.

**Available Tools**
In your response, you can use the following tools:
{tools}

**Steps for Each Turn**
1. **Think:** Recall relevant context and analyze the current user goal.
2. **Decide on Tool Usage:** If a tool is needed, specify the tool and its parameters.
3. **Respond Appropriately:** If a response is needed, generate one while maintaining consistency across user queries.

**Output Format**
```plaintext
<think> Your thoughts and reasoning </think>
<tool_call>
{call_example}
...
</tool_call>
<response> AI's final response </response>
```

**Important Notes**
1. You must always include the `<think>` field to outline your reasoning. Provide at least one of `<tool_call>` or `<response>`. Decide whether to use `<tool_call>` (possibly multiple times), `<response>`, or both.
2. You can invoke multiple tool calls simultaneously in the `<tool_call>` fields. Each tool call should be a JSON object with a "name" field and an "parameters" field containing a dictionary of parameters. If no parameters are needed, leave the "parameters" field an empty dictionary.
3. Refer to the previous dialogue records in the history, including the user's queries, previous `<tool_call>`, `<response>`, and any tool feedback noted as `<obs>` (if exists).
"""


@dataclass
class BFCLItem:
    """One BFCL test entry, ready to prompt and to score."""

    id: str
    category: str
    messages: list[dict]  # [system, user], the handler's layout
    functions: list[dict]  # the entry's function docs, as in the file (the checker reads these)
    answers: list[dict] | None  # possible answers [{name: {param: [values]}}]; None for (ir)relevance


def default_bfcl_dir() -> Path:
    """The data folder inside the installed `bfcl-eval` package."""
    try:
        return Path(str(importlib.resources.files("bfcl_eval") / "data"))
    except ModuleNotFoundError:
        raise FileNotFoundError("BFCL data not found: `pip install --no-deps bfcl-eval`, or give bfcl_dir") from None


def category_file(folder: Path, category: str) -> Path:
    """The newest BFCL_v<N>_<category>.json in `folder`."""
    for stem in FILE_STEMS.get(category, (category,)):
        # an exact pattern: a glob "BFCL_v*_parallel.json" would also match "..._live_parallel.json"
        pattern = re.compile(rf"BFCL_v(\d+)_{stem}\.json")
        versions = {int(m.group(1)): p for p in folder.iterdir() if (m := pattern.fullmatch(p.name))}
        if versions:
            return versions[max(versions)]
    raise FileNotFoundError(f"no BFCL_v<N>_{category}.json in {folder}")


def format_tools(functions: list[dict]) -> str:
    """The handler's numbered list; each description carries BFCL's Python hint."""
    return "\n".join(
        f"{i}. Name: {f['name']}\nDescription: {f['description'] + PYTHON_HINT}\n"
        f"Parameters: {json.dumps(f['parameters'].get('properties', {}))}"
        for i, f in enumerate(functions, start=1))


def format_user_turn(question: list[dict]) -> str:
    """The handler's single-turn user message: each user turn wrapped with the no-call hint."""
    text = "**Dialogue Records History**\n"
    for message in question:
        if message["role"] == "user":
            text += f"<user> {message['content'].strip()}\n{NO_CALL_HINT} </user>\n"
        elif message["role"] == "assistant":
            text += f"\n{message['content'].strip()}\n"
        # system messages are dropped, as in the handler
    return text.strip()


def to_messages(entry: dict) -> list[dict]:
    system = SYSTEM_PROMPT.format(tools=format_tools(entry["function"]), call_example=CALL_EXAMPLE)
    return [{"role": "system", "content": system},
            {"role": "user", "content": format_user_turn(entry["question"][0])}]


def load_category(category: str, bfcl_dir: str | Path | None = None, limit: int | None = None) -> list[BFCLItem]:
    """The first `limit` (all if None) items of one category, answers aligned by id."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; expected one of {CATEGORIES}")
    folder = Path(bfcl_dir) if bfcl_dir else default_bfcl_dir()
    entries = read_jsonl(category_file(folder, category))[:limit]
    if category in RELEVANCE_CATEGORIES:
        return [BFCLItem(e["id"], category, to_messages(e), e["function"], None) for e in entries]
    answers = {a["id"]: a["ground_truth"] for a in read_jsonl(category_file(folder / "possible_answer", category))}
    missing = [e["id"] for e in entries if e["id"] not in answers]
    if missing:
        raise ValueError(f"{len(missing)} {category} entries have no possible answer, e.g. {missing[0]}")
    return [BFCLItem(e["id"], category, to_messages(e), e["function"], answers[e["id"]]) for e in entries]
