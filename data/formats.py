"""One row of each supported file layout -> one `Example`, with every row checked on the way.

Layouts (the ToolRL release, Qian et al. 2025, github.com/qiancheng0/ToolRL):
- ToolRL raw JSON `{instruction, input, output}` (`dataset/rlla_4k_raw/*.json`, `rlla_sft.json`):
  system = instruction, user = input, ground truth = output.
- ToolRL/verl parquet (`dataset/rlla_4k/*.parquet`): `prompt` = [system, user] messages,
  `reward_model.ground_truth` = target output.
- API-Bank as processed by ToolRL `{system, user, answer, other}`: `answer` is the gold call
  `{name, parameters}` (a one-element list in levels 1 and 3, a dict in level 2). The ground truth
  is written from it in ToolRL's output format with ToolRL's placeholder thought.
- JSONL `{"messages": [...], "ground_truth": "...", "id"?: "..."}`: users' own data.

A converter raises `BadRow(reason)`; the loader adds the file name and row index.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
# ToolRL's placeholder thought in its RL targets (`reward_model.ground_truth` of rlla_4k).
PLACEHOLDER_THOUGHT = "<think> I should use the appropriate tool with proper parameters to respond to the user's need. </think>"


def with_placeholder_thought(text: str) -> str:
    """`text` with its `<think>...</think>` replaced by ToolRL's placeholder thought (its calls and response
    kept): the RL data's own short format. The SFT file's distilled thoughts (median ~390 tokens of answer)
    are too long for a small model to imitate without looping inside them."""
    head, opened, rest = text.partition("<think>")
    _, closed, tail = rest.partition("</think>")
    if not (opened and closed):
        return text
    return head + PLACEHOLDER_THOUGHT + tail


@dataclass
class Example:
    """One prompt and its target.

    id:           unique within a source, "<file stem>-<row index in the file>" for files
    messages:     the prompt, [{"role", "content"}, ...]: system then user for every built-in
                  format; always ends with a user turn
    ground_truth: the target in ToolRL's output format: `<think>...</think>` then a
                  `<tool_call>` block (one JSON call per line) and/or `<response>...</response>`
    gold:         API-Bank only: the gold call {"name", "parameters"} the evaluator compares with
    meta:         extra facts per source, e.g. {"level": 2} for API-Bank
    """
    id: str
    messages: list[dict[str, str]]
    ground_truth: str
    gold: dict | None = None
    meta: dict = field(default_factory=dict)


class BadRow(ValueError):
    """A row that breaks its layout's contract; the message says what is wrong."""


# ---------------------------------------------------------------- checks shared by all layouts

def call_block_lines(segment: str) -> list:
    """The JSON values of one `<tool_call>` block, one per line. `segment` is the text after a
    `<tool_call>` tag up to the next one; the block is its part before any `</tool_call>`."""
    lines = segment.partition("</tool_call>")[0].strip().split("\n")
    if lines == [""]:
        raise BadRow("the <tool_call> block is empty")
    values = []
    for number, line in enumerate(lines, start=1):
        try:
            values.append(json.loads(line))
        except (json.JSONDecodeError, RecursionError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise BadRow(f"line {number} of the <tool_call> block is not JSON ({reason}): {line[:80]!r}") from None
    return values


def ground_truth_calls(text: str) -> list[dict]:
    """The calls of a ground truth; [] when it has no `<tool_call>` (a response-only target).

    The contract ToolRL's reward code reads ground truths with: one JSON object per line of the
    `<tool_call>` block, each with a string `name` and a dict `parameters`. Some distilled
    thoughts mention the literal tag `<tool_call>` (17 rows of rlla_sft.json), so the first tag
    may not open the real block: as the reward module (rewards/toolrl.py) does, read the first
    block, and if it is not JSON lines, the last one.
    """
    segments = text.split("<tool_call>")[1:]
    if not segments:
        return []
    if "</tool_call>" not in segments[-1]:
        raise BadRow("the last <tool_call> is not closed by </tool_call>")
    try:
        values = call_block_lines(segments[0])
    except BadRow:
        if len(segments) == 1:
            raise
        values = call_block_lines(segments[-1])
    for number, call in enumerate(values, start=1):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) \
                or not isinstance(call.get("parameters"), dict):
            raise BadRow(f"line {number} of the <tool_call> block is not "
                         f'{{"name": str, "parameters": dict}}: {json.dumps(call)[:80]!r}')
    return values


def check_ground_truth(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRow(f"ground truth must be a non-empty string, got {short(text)}")
    if "<tool_call>" not in text and "<response>" not in text:
        raise BadRow("ground truth has neither a <tool_call> block nor a <response>")
    ground_truth_calls(text)
    return text


def check_messages(messages) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"messages must be a non-empty list, got {short(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {short(m)}")
    if messages[-1]["role"] != "user":
        raise BadRow(f"the last message must be the user's, got role {messages[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def require_str(row: dict, key: str) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"field {key!r} must be a non-empty string, got {short(value)}")
    return value


def short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def chat(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------- one converter per layout

def from_toolrl(row, row_id: str) -> Example:
    system, user = require_str(row, "instruction"), require_str(row, "input")
    return Example(row_id, chat(system, user), check_ground_truth(require_str(row, "output")))


def from_verl(row, row_id: str) -> Example:
    prompt = row.get("prompt")
    if hasattr(prompt, "tolist"):  # pyarrow gives a numpy array of dicts
        prompt = prompt.tolist()
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise BadRow(f"field 'reward_model' must be a dict with 'ground_truth', got {short(reward_model)}")
    return Example(row_id, check_messages(prompt), check_ground_truth(reward_model.get("ground_truth")))


def apibank_gold(answer) -> dict:
    """The single gold call: `answer` is [call] in levels 1 and 3 and call in level 2."""
    if isinstance(answer, list):
        if len(answer) != 1:
            raise BadRow(f"field 'answer' must hold exactly one gold call, got a list of {len(answer)}")
        answer = answer[0]
    if not isinstance(answer, dict) or not isinstance(answer.get("name"), str) \
            or not isinstance(answer.get("parameters"), dict):
        raise BadRow(f"field 'answer' must be {{'name': str, 'parameters': dict}}, got {short(answer)}")
    return {"name": answer["name"], "parameters": answer["parameters"]}


def apibank_ground_truth(gold: dict) -> str:
    """ToolRL's output format for one call, with ToolRL's placeholder thought."""
    return f"{PLACEHOLDER_THOUGHT}\n<tool_call>\n{json.dumps(gold)}\n</tool_call>"


def from_apibank(row, row_id: str, level: int | None) -> Example:
    system, user = require_str(row, "system"), require_str(row, "user")
    gold = apibank_gold(row.get("answer"))
    meta = {"level": level, "other": row.get("other")}
    return Example(row_id, chat(system, user), check_ground_truth(apibank_ground_truth(gold)), gold, meta)


def from_jsonl(row, row_id: str) -> Example:
    if not isinstance(row, dict):
        raise BadRow(f"each line must be a JSON object, got {short(row)}")
    own_id = row.get("id")
    return Example(own_id if isinstance(own_id, str) else row_id, check_messages(row.get("messages")),
                   check_ground_truth(row.get("ground_truth")))
