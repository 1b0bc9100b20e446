"""Checkpoints: an HF model directory plus the trainer state, written atomically.

Layout of `output_dir/checkpoint-000040/`: model.safetensors, config.json, generation_config.json,
tokenizer files (so `AutoModelForCausalLM.from_pretrained` loads it as-is), train_config.json, and
trainer_state.pt (the step, and the optimizer state as whole tensors keyed by parameter name, so that a
checkpoint saved by N ranks, sharded or not, resumes on any number). Nothing else is needed to continue the
same run: the prompt order is a pure function of (seed, epoch), and the sampling generator is re-seeded
from (seed, step, rank) at the start of every step.

A checkpoint is written under a temporary name and renamed when complete, so a run killed mid-write
leaves only a `.tmp-*` directory, which resuming ignores and the next save removes. A checkpoint that
fails to load is reported and skipped in favour of the one before it.
"""
import json
import os
import shutil
from pathlib import Path

import torch

from grpo import dist

PREFIX = "checkpoint-"


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, optimizer, config_json: str,
                    keep: int) -> Path:
    """Write checkpoint-{step} atomically and keep only the newest `keep` checkpoints.

    distributed: every rank calls this (gathering FSDP shards is a collective); rank 0 alone writes.
    """
    final = output_dir / f"{PREFIX}{step:06d}"
    # Whole tensors on CPU, keyed by parameter name: the same files whether 1 or N ranks saved them.
    model_state, optimizer_state = dist.full_state_dicts(model, optimizer)
    if dist.rank() == 0:
        tmp = output_dir / f".tmp-{PREFIX}{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_config.json").write_text(config_json)
        torch.save({"step": step, "optimizer": optimizer_state}, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)                              # the commit point: atomic on one filesystem
        for old in list_checkpoints(output_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()                                          # distributed: the others wait until it is on disk
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state; raises if the checkpoint is incomplete or corrupt. Never unpickles code."""
    for name in ("config.json", "model.safetensors", "trainer_state.pt", "train_config.json"):
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"{checkpoint}: missing {name}")
    json.loads((checkpoint / "config.json").read_text())
    from safetensors import safe_open
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:   # reads the header: catches truncation
        for key in f.keys():
            f.get_slice(key)
    return torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")


def find_resumable(path: Path) -> tuple[Path, dict] | None:
    """(checkpoint, trainer_state) for the newest loadable checkpoint at `path`, which may be an output
    directory or one checkpoint; None when there is none. Unloadable ones are reported and skipped."""
    candidates = [path] if path.name.startswith(PREFIX) else list_checkpoints(path)
    for checkpoint in candidates:
        try:
            return checkpoint, load_trainer_state(checkpoint)
        except Exception as e:  # any failure to read means: not usable, try the one before
            print(f"skipping unusable checkpoint {checkpoint}: {type(e).__name__}: {e}")
    return None
