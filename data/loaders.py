"""`load_examples`: a file path or a name ("toolrl", "toolrl-sft", "apibank", "demo", "demo-sft") -> a checked
list of `Example`s.

The format is read from the file: `.parquet` is verl's layout, `.jsonl` is `{messages,
ground_truth}` lines, and a `.json` list is ToolRL raw or API-Bank according to the keys of its
rows (see `data/formats.py`).

Names. "toolrl" (the paper's 4K RL set), "toolrl-sft" (its SFT400 set) and "apibank" (levels 1-3
as ToolRL processed them) are files of ToolRL's repository at one pinned commit, downloaded once
into `cache_dir()` and checked against a hash written here before they are used. "demo" is built
by code (data/demo.py), and so is "demo-sft", its train split answered by an imperfect teacher (the demo
run's warm-start data, as "toolrl-sft" is the paper's).

Splits. `split=None` returns every row of the source, in file order. `split="train"/"test"`
(and "validation" for the demo) applies the source's own split, which exists for two kinds of source only:
- a ToolRL raw JSON file (`"toolrl"`, `"toolrl-sft"`, or a path): the split of ToolRL's preprocessing
  script, `np.random.seed(31415); np.random.shuffle(rows)`, then the last `int(0.02 * N)` rows are test
  and the rest train (4,000 -> 3,920 / 80). Shuffling happens before any row is checked, so a bad row
  never moves the others between splits. For choosing a recipe without looking at test, the train rows
  are cut once more: "validation" is the last tenth of them (in the same shuffled order) and "fit" the
  rest, so train = fit + validation (toolrl-sft's 400 rows: 353 fit, 39 validation, 8 test).
- `"demo"`: the built-in train/validation/test split (data/demo.py).
Parquet, API-Bank and JSONL files are already one split each; asking them for a split is an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from data.demo import demo_rows, teacher_rows
from data.jsonl import read_numbered_jsonl
from data.formats import (BadRow, Example, chat, check_ground_truth, from_apibank, from_jsonl, from_toolrl,
                          from_verl)

TOOLRL_SPLIT_SEED = 31415
TOOLRL_TEST_FRACTION = 0.02
VALIDATION_FRACTION = 0.1      # of the train rows: a ToolRL raw file's "validation"; the rest is "fit"
SPLITS = ("train", "test", "fit", "validation")
DEMO_SPLITS = ("train", "validation", "test")


def load_examples(source: str, split: str | None = None, skip_bad_rows: bool = False) -> list[Example]:
    """Examples from `source`: a path (.json, .jsonl, .parquet) or a name: "toolrl", "toolrl-sft",
    "apibank" (all three levels, `meta["level"]` 1-3), "demo" or "demo-sft" (the demo's train prompts with
    an imperfect teacher's targets, data/demo.py).

    Every row is checked (fields and types, and the ground truth's `<tool_call>` block parses), except
    demo-sft's, whose targets are the teacher's (70% of their calls say "arguments"), not ground truths.
    A bad row raises ValueError naming the file, where the row is (the 1-based line of a .jsonl file, the
    1-based row of a .json list or .parquet table) and the problem; with `skip_bad_rows=True` (train.py's and
    eval.py's --skip_bad_rows) bad rows are dropped instead and listed on stdout. A file with no rows is an
    error.
    """
    if source == "demo":
        if split is not None and split not in DEMO_SPLITS:
            raise ValueError(f"the demo set's splits are {', '.join(DEMO_SPLITS)}; got {split!r}")
        return demo_examples(split)
    if source == "demo-sft":         # the teacher's targets, to imitate; not gold calls to score against
        if split is not None:
            raise ValueError(f"'demo-sft' is one split (the demo's train prompts); pass split=None, not {split!r}")
        return [demo_example(f"demo-sft-{i}", row, row["ground_truth"]) for i, row in enumerate(teacher_rows())]
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None or one of {', '.join(SPLITS)}; got {split!r}")
    if source in DATASETS:
        if split is not None and source not in ("toolrl", "toolrl-sft"):
            raise ValueError(f"'{source}' is one split; pass split=None (splits apply to 'toolrl', 'toolrl-sft', "
                             "'demo' and ToolRL raw JSON files)")
        return [example for path in download(source) for example in load_file(path, split, skip_bad_rows)]
    return load_file(existing_file(source), split, skip_bad_rows)


def load_file(path: Path, split: str | None, skip_bad_rows: bool) -> list[Example]:
    layout, rows, places = read_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    indexed = list(enumerate(rows))
    if split is not None:
        if layout != "toolrl":
            raise ValueError(f"{path} is a {layout} file, which holds one split already; pass split=None "
                             "(splits apply to ToolRL raw JSON files and to 'demo')")
        indexed = [indexed[i] for i in toolrl_split_indices(len(rows), split)]
    return convert_rows(path, layout, indexed, places, skip_bad_rows)


def toolrl_split_indices(num_rows: int, split: str) -> list[int]:
    """Row indices of ToolRL's train or test split (or of train's fit and validation parts), in shuffled order.

    Same permutation as ToolRL's `np.random.seed(31415); np.random.shuffle(rows)`: the legacy
    RandomState draws the same swaps for a list of rows as for an index array. A private
    RandomState leaves numpy's global RNG untouched.
    """
    order = np.arange(num_rows)
    np.random.RandomState(TOOLRL_SPLIT_SEED).shuffle(order)
    num_test = int(TOOLRL_TEST_FRACTION * num_rows)
    train, test = order[:num_rows - num_test], order[num_rows - num_test:]
    num_validation = int(VALIDATION_FRACTION * len(train))
    return {"train": train, "test": test, "fit": train[:len(train) - num_validation],
            "validation": train[len(train) - num_validation:]}[split].tolist()


def convert_rows(path: Path, layout: str, indexed: list[tuple[int, object]], places: list[str],
                 skip_bad_rows: bool) -> list[Example]:
    """Examples of the (index, row) pairs; `places[index]` says where a row is in the file ("line 7")."""
    convert = converter(layout, path)
    examples, bad = [], []
    for index, row in indexed:
        try:
            examples.append(convert(row, f"{path.stem}-{index}"))
        except BadRow as e:
            if not skip_bad_rows:
                raise ValueError(f"{path}: {places[index]}: {e} (--skip_bad_rows drops bad rows)") from None
            bad.append((places[index], str(e)))
    if bad:
        print(f"skipped {len(bad)} bad row(s) of {len(indexed)} in {path}:")
        for place, reason in bad:
            print(f"  {place}: {reason}")
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
    splits = DEMO_SPLITS if split is None else (split,)
    return [demo_example(f"demo-{name}-{i}", row, check_ground_truth(row["ground_truth"]))
            for name in splits for i, row in enumerate(demo_rows(name))]


def demo_example(id: str, row: dict, target: str) -> Example:
    """A demo row (data/demo.py) as an Example whose target is `target`."""
    return Example(id, chat(row["system"], row["user"]), target, meta={"num_calls": len(row["calls"])})


# ---------------------------------------------------------------- files and their layouts

def existing_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {source!r}. Give a path to a .json (ToolRL raw or "
                                f"API-Bank), .jsonl or .parquet file, or a name: {', '.join(NAMES)}.")
    return path


def read_rows(path: Path) -> tuple[str, list, list[str]]:
    """(layout, rows, places): layout is "toolrl", "apibank", "jsonl" or "verl-parquet"; places[i] says where
    row i is, counted from 1 as an editor does: "line N" of a .jsonl file, "row N" of a .json list or table."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        numbered = read_numbered_jsonl(path)
        return "jsonl", [row for _, row in numbered], [f"line {n}" for n, _ in numbered]
    if suffix == ".parquet":
        rows = read_parquet(path)
        return "verl-parquet", rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    if suffix == ".json":
        rows = read_json(path)
        return json_layout(path, rows), rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    raise ValueError(f"unknown data format for {path}: expected a .json, .jsonl or .parquet file, "
                     f"or a name: {', '.join(NAMES)}")


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
    """The file's JSON value; an empty or binary file, bytes that are not UTF-8, nesting deeper than Python's
    parser allows, or an integer of over 4,300 digits is a ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (a binary file?): byte {e.start} is {e.object[e.start]:#x}") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
    except ValueError as e:   # JSONDecodeError, or the limit on an integer's digits
        raise ValueError(f"{path} is not valid JSON: {'empty file' if not path.stat().st_size else e}") from None


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


# ---------------------------------------------------------------- the named data sets: pinned downloads

TOOLRL_COMMIT = "8cee13ec0ca72f0461da372a93a6fd8140dbb840"  # qiancheng0/ToolRL, the files the paper released
TOOLRL_RAW = f"https://raw.githubusercontent.com/qiancheng0/ToolRL/{TOOLRL_COMMIT}/"
DOWNLOAD_TIMEOUT = 20  # seconds without a byte before a download fails: offline fails fast, no retries


class RemoteFile(NamedTuple):
    path: str     # in ToolRL's repository at TOOLRL_COMMIT
    hash: str     # "sha256", or "git-blob": the id git gives the file (see file_digest)
    digest: str   # hex


class Dataset(NamedTuple):
    files: tuple[RemoteFile, ...]
    local_copy: str  # how train.py / eval.py take a local copy instead: the way out when a download fails


DATASETS = {
    "toolrl": Dataset(
        (RemoteFile("dataset/rlla_4k_raw/rlla_rl.json", "git-blob", "1827b67d516cca98f58541c8d218a038d13321e3"),),
        "pass a local copy with train.py --data PATH --data_split train, or its held-out split "
        "(dataset/rlla_4k/test.parquet) with eval.py --toolrl_data PATH"),
    "toolrl-sft": Dataset(
        (RemoteFile("dataset/rlla_4k_raw/rlla_sft.json", "sha256",
                    "ef42a7b1574f1552d6cc7bf9f060a6425458ff67bae2baf53e945dc640dc125c"),),
        "pass a local copy with train.py --sft_data PATH (or --data PATH, which --model SmolLM2-135M-Instruct "
        "on a CPU warm-starts on too)"),
    "apibank": Dataset(
        tuple(RemoteFile(f"benchmarks/API-Bank/level-{level}-api_processed.json", "sha256", digest)
              for level, digest in [(1, "51ebc8209ba467ce4cc1854d23b2cfd89759f3c45ff2aaf90de4f003162ea98f"),
                                    (2, "75c8097b3127d1f7aec13edb6b7a8428565d753b107f2b1e20daa3d0cfda51db"),
                                    (3, "57228427976f05725d9cf2f0ab03ac16487efaed67d5a929b28e974b9b27ef05")]),
        "pass a folder holding the three level-N-api_processed.json files with eval.py --apibank_dir PATH"),
}
NAMES = (*DATASETS, "demo", "demo-sft")


class DownloadError(SystemExit):
    """A file of a named data set could not be fetched, or its bytes are not the pinned ones.

    A SystemExit, like argparse's errors: train.py and eval.py stop with this one line rather than a
    traceback, and no `except Exception` on the way swallows it. Catch it by name to handle it."""


def cache_dir() -> Path:
    return Path(os.environ.get("GRPO_CACHE", "~/.cache/grpo-toolrl")).expanduser()


def download(name: str) -> list[Path]:
    """The files of `DATASETS[name]` in the cache, each downloaded on first use."""
    dataset = DATASETS[name]
    return [fetch(remote, dataset.local_copy) for remote in dataset.files]


def fetch(remote: RemoteFile, local_copy: str) -> Path:
    """One file of ToolRL's repository at TOOLRL_COMMIT, downloaded once into `cache_dir()`.

    The bytes go to a temporary name of this process and are renamed only after their hash matches,
    so the cache never holds a partial or unexpected file, and ranks downloading at once (torchrun)
    never write into each other's file. A file in the cache passed that check when it was renamed.
    """
    path = cache_dir() / f"ToolRL-{TOOLRL_COMMIT[:7]}" / Path(remote.path).name
    if path.is_file():
        return path
    url = TOOLRL_RAW + remote.path
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        stream(url, temporary, path.name)
        actual = file_digest(temporary, remote.hash)
        if actual == remote.digest:
            os.replace(temporary, path)
            return path
    except OSError as e:  # URLError, HTTPError and socket timeouts are all OSErrors
        reason = e.reason if type(e) is urllib.error.URLError else e  # URLError's str adds "<urlopen error ...>"
        raise DownloadError(f"could not download {path.name} from {url} ({reason}); {local_copy}") from None
    finally:
        temporary.unlink(missing_ok=True)  # after a failure, a mismatch or Ctrl-C; gone already when renamed
    raise DownloadError(f"{path.name} from {url} has {remote.hash} {actual}, expected {remote.digest}, so it "
                        f"was deleted; {local_copy}")


def stream(url: str, path: Path, name: str) -> None:
    """Write the body at `url` to `path` with a progress bar; one try, DOWNLOAD_TIMEOUT per read."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(path, "wb") as out, \
            tqdm(total=int(response.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                 desc=name) as bar:
        while chunk := response.read(1 << 16):
            out.write(chunk)
            bar.update(len(chunk))


def file_digest(path: Path, kind: str) -> str:
    """sha256 of the file, or its git blob id: sha1 of b"blob <size>\\0" + content (`git hash-object`).

    The blob id pins a file by the id GitHub shows for it; the size comes from the file on disk, so
    it need not be known before the download."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size) if kind == "git-blob" else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
