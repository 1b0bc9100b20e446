"""`load_examples`: a file path or a name ("toolrl", "demo") -> a checked list of `Example`s.

The format is read from the file: `.parquet` is verl's layout, `.jsonl` is `{messages,
ground_truth}` lines, and a `.json` list is ToolRL raw or API-Bank according to the keys of its
rows (see `data/formats.py`). `"toolrl"` downloads the paper's 4K RL set once into a cache.

Splits. `split=None` returns every row of the source, in file order. `split="train"/"test"`
applies the source's own split, which exists for two kinds of source only:
- a ToolRL raw JSON file (including `"toolrl"`): the split of ToolRL's preprocessing script,
  `np.random.seed(31415); np.random.shuffle(rows)`, then the last `int(0.02 * N)` rows are test
  and the rest train (4,000 -> 3,920 / 80). Shuffling happens before any row is checked, so a
  bad row never moves the others between splits.
- `"demo"`: the built-in train/test split (data/demo.py).
Parquet, API-Bank and JSONL files are already one split each; asking them for a split is an error.
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np

from data.demo import demo_rows
from data.formats import (BadRow, Example, chat, check_ground_truth, from_apibank, from_jsonl, from_toolrl,
                          from_verl)

TOOLRL_URL = "https://raw.githubusercontent.com/qiancheng0/ToolRL/main/dataset/rlla_4k_raw/rlla_rl.json"
TOOLRL_SPLIT_SEED = 31415
TOOLRL_TEST_FRACTION = 0.02
SPLITS = ("train", "test")


def load_examples(source: str, split: str | None = None, skip_bad_rows: bool = False) -> list[Example]:
    """Examples from `source`: a path (.json, .jsonl, .parquet) or the name "toolrl" or "demo".

    Every row is checked (fields and types, and the ground truth's `<tool_call>` block parses).
    A bad row raises ValueError naming the file, the row index and the problem; with
    `skip_bad_rows=True` bad rows are dropped instead and listed on stdout.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
    if source == "demo":
        return demo_examples(split)
    path = download_toolrl() if source == "toolrl" else existing_file(source)
    layout, rows = read_rows(path)
    indexed = list(enumerate(rows))
    if split is not None:
        if layout != "toolrl":
            raise ValueError(f"{path} is a {layout} file, which holds one split already; pass split=None "
                             "(splits apply to ToolRL raw JSON files and to 'demo')")
        indexed = [indexed[i] for i in toolrl_split_indices(len(rows), split)]
    return convert_rows(path, layout, indexed, skip_bad_rows)


def toolrl_split_indices(num_rows: int, split: str) -> list[int]:
    """Row indices of ToolRL's train or test split, in shuffled order.

    Same permutation as ToolRL's `np.random.seed(31415); np.random.shuffle(rows)`: the legacy
    RandomState draws the same swaps for a list of rows as for an index array. A private
    RandomState leaves numpy's global RNG untouched.
    """
    order = np.arange(num_rows)
    np.random.RandomState(TOOLRL_SPLIT_SEED).shuffle(order)
    num_test = int(TOOLRL_TEST_FRACTION * num_rows)
    chosen = order[num_rows - num_test:] if split == "test" else order[:num_rows - num_test]
    return chosen.tolist()


def convert_rows(path: Path, layout: str, indexed: list[tuple[int, object]], skip_bad_rows: bool) -> list[Example]:
    convert = converter(layout, path)
    examples, bad = [], []
    for index, row in indexed:
        try:
            examples.append(convert(row, f"{path.stem}-{index}"))
        except BadRow as e:
            if not skip_bad_rows:
                raise ValueError(f"{path}: row {index}: {e} (pass skip_bad_rows=True to drop bad rows)") from None
            bad.append((index, str(e)))
    if bad:
        print(f"skipped {len(bad)} bad row(s) of {len(indexed)} in {path}:")
        for index, reason in bad:
            print(f"  row {index}: {reason}")
    return examples


def converter(layout: str, path: Path):
    """The function (row, row_id) -> Example for a layout."""
    if layout == "apibank":
        return partial(from_apibank, level=apibank_level(path))
    return {"toolrl": from_toolrl, "verl-parquet": from_verl, "jsonl": from_jsonl}[layout]


def apibank_level(path: Path) -> int | None:
    """1, 2 or 3 from ToolRL's file names `level-N-api_processed.json`; None if not named so."""
    match = re.search(r"level-(\d+)", path.name)
    return int(match.group(1)) if match else None


def demo_examples(split: str | None) -> list[Example]:
    splits = SPLITS if split is None else (split,)
    return [Example(f"demo-{name}-{i}", chat(row["system"], row["user"]), check_ground_truth(row["ground_truth"]),
                    meta={"num_calls": len(row["calls"])})
            for name in splits for i, row in enumerate(demo_rows(name))]


# ---------------------------------------------------------------- files and their layouts

def existing_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {source!r}. Give a path to a .json (ToolRL raw or "
                                "API-Bank), .jsonl or .parquet file, or the name 'toolrl' or 'demo'.")
    return path


def read_rows(path: Path) -> tuple[str, list]:
    """(layout, rows): layout is "toolrl", "apibank", "jsonl" or "verl-parquet"."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "verl-parquet", read_parquet(path)
    if suffix == ".jsonl":
        return "jsonl", read_jsonl(path)
    if suffix == ".json":
        rows = read_json(path)
        return json_layout(path, rows), rows
    raise ValueError(f"unknown data format for {path}: expected a .json, .jsonl or .parquet file, "
                     "or the name 'toolrl' or 'demo'")


def json_layout(path: Path, rows) -> str:
    """A .json file is a list of rows; the keys of its first row tell ToolRL raw from API-Bank."""
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        raise ValueError(f"unknown data format in {path}: expected a non-empty JSON list of objects")
    keys = set(rows[0])
    if {"instruction", "input", "output"} <= keys:
        return "toolrl"
    if {"system", "user", "answer"} <= keys:
        return "apibank"
    raise ValueError(f"unknown data format in {path}: its first row has keys {sorted(keys)}; expected "
                     "ToolRL raw {instruction, input, output} or API-Bank {system, user, answer, other}")


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_jsonl(path: Path) -> list:
    """One JSON value per line; blank lines are allowed and not counted as rows."""
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {number} is not valid JSON: {e}") from None
    return rows


def read_parquet(path: Path) -> list[dict]:
    # pandas and pyarrow are optional dependencies, needed only here
    try:
        import pandas as pd
        import pyarrow  # noqa: F401  (pandas' parquet engine)
    except ImportError:
        raise ImportError(f"reading {path} needs pandas and pyarrow: pip install pandas pyarrow") from None
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise ValueError(f"could not read {path} as parquet: {e}") from None
    return frame.to_dict("records")


# ---------------------------------------------------------------- the "toolrl" download

def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", "~/.cache/grpo-toolrl")).expanduser()


def download_toolrl(url: str = TOOLRL_URL) -> Path:
    """ToolRL's `rlla_rl.json` (4,000 rows), downloaded once into `cache_dir()`.

    The download goes to a temporary name and is renamed only after it parses as JSON, so an
    interrupted download never leaves a broken file in the cache.
    """
    from tqdm import tqdm

    path = cache_dir() / "rlla_rl.json"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=20) as response, open(partial, "wb") as out, \
                tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B",
                     unit_scale=True, desc=path.name) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))
        json.loads(partial.read_text(encoding="utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not download the ToolRL data from {url} ({e}). Without internet, fetch "
            "dataset/rlla_4k_raw/rlla_rl.json from github.com/qiancheng0/ToolRL elsewhere and pass its "
            "path: load_examples('path/to/rlla_rl.json', split='train')") from None
    os.replace(partial, path)
    return path
