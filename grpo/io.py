"""Files written whole or not at all: a temporary name beside the target, then one rename.

A process killed while writing (SIGKILL, out of memory, a preempted node) must not leave half a file
under a name that something reads later: half a metrics.jsonl, a config.json without its weights.
So everything is written to `.tmp-<name>` in the target's own directory, its bytes are flushed to
the disk, and `os.replace` puts it under the real name; that rename is atomic on one filesystem, so
a reader sees the old file or the new one, never a mix. A kill leaves at most a `.tmp-*` file or
directory, which the next write of the same name removes.

    with atomic_path(out / "sft-init") as tmp:       # a directory: fill it, it is renamed at the end
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    atomic_write_text(out / "train_config.json", text)

The one JSONL reader is `data/jsonl.py` (torch-free, so that `data/` can use it too).
"""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; write a file or a directory there. When the block ends
    without an exception, it replaces `path`; when it raises, it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    remove(tmp)                                         # left by a run killed while writing it
    try:
        yield tmp
        sync(tmp)                                       # the bytes reach the disk before the name does
        if path.is_dir():                               # os.replace cannot replace a non-empty directory,
            shutil.rmtree(path)                         # so a kill just here loses the old one (never half)
        os.replace(tmp, path)                           # the commit point
    except BaseException:                               # KeyboardInterrupt too: no .tmp-* left behind
        remove(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """`path.write_text(text)` in UTF-8, written whole or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sync(path: Path) -> None:
    """fsync a file, or every file under a directory (the page cache survives a killed process, not a
    power cut)."""
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
