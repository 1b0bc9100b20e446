"""The project's one JSONL reader: data files, metrics.jsonl, samples.jsonl, eval predictions.

Lines end at "\\n" and nowhere else. `str.splitlines` would also cut at U+0085, U+2028, U+2029
(and \\v, \\f, \\x1c-\\x1e), which JSON writes raw inside strings (`ensure_ascii=False`), so a model
that writes one of them would make its own predictions unreadable. Each line is decoded as UTF-8
on its own, so an error names its line.

A process killed while appending leaves a last line with no "\\n" after it; that line alone may be
skipped (with a message). Any other bad line is an error naming the file and its 1-based line.
Torch-free, like the rest of `data/`.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path) -> list:
    """One JSON value per line, in file order; blank lines are allowed and yield nothing."""
    return [row for _, row in read_numbered_jsonl(path)]


def read_numbered_jsonl(path) -> list[tuple[int, object]]:
    """(1-based line number, JSON value) for each non-blank line."""
    path = Path(path)
    lines = path.read_bytes().split(b"\n")   # the last item is b"" when the file ends with "\n"
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also a 5,000-digit integer
            if number == len(lines):           # no "\n" after it: cut off by a kill mid-write
                print(f"{path}: ignoring line {number}, cut off before its end (a kill while writing?)")
                continue
            reason = "nested too deeply" if isinstance(e, RecursionError) else e
            raise ValueError(f"{path}: line {number} is not valid JSON: {reason}") from None
    return rows
