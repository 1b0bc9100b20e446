"""Checkpoints: an HF model directory plus the trainer state, written atomically.

Layout of `output_dir/checkpoint-000040/`: model.safetensors, config.json, generation_config.json,
tokenizer files (so `AutoModelForCausalLM.from_pretrained` loads it as-is), train_config.json, and
trainer_state.pt (the step, and the optimizer state as whole tensors keyed by parameter name, so that a
checkpoint saved by N ranks, sharded or not, resumes on any number). Nothing else is needed to continue the
same run: the prompt order is a pure function of (seed, epoch), and the sampling generator is re-seeded
from (seed, step, rank) at the start of every step.

A checkpoint is written under a temporary name and renamed when complete (grpo/io.py), so a run killed
mid-write leaves only a `.tmp-*` directory, which resuming ignores and the next save of that step removes.
A checkpoint is used only if it is whole: every tensor of the model its config.json describes is in the
weights file with its shape and dtype (read from the headers: no weight is loaded to check), and the
trainer state holds what the resume reads. Otherwise it is reported in one line and the one before it is
tried; nothing is ever loaded with tensors missing.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from grpo import dist, lora
from grpo.io import atomic_path
from grpo.model import is_adapter

PREFIX = "checkpoint-"


def save_checkpoint(output_dir: Path, step: int, model, tokenizer, optimizer, schedule, config_json: str,
                    keep: int) -> Path:
    """Write checkpoint-{step} atomically, then remove older checkpoints beyond the newest `keep` (this one
    included).

    distributed: every rank calls this (gathering FSDP shards is a collective); rank 0 alone writes.
    """
    final = output_dir / f"{PREFIX}{step:06d}"
    adapters = hasattr(model, "peft_config")                # a peft model (--lora_r): its adapters alone
    # Whole tensors on CPU, keyed by parameter name: the same files whether 1 or N ranks saved them.
    model_state, optimizer_state = dist.full_state_dicts(model, optimizer, weights=not adapters)
    if dist.rank() == 0:
        with atomic_path(final) as tmp:                     # .tmp-checkpoint-N, renamed to `final` when whole
            if adapters:                                    # adapter_config.json + adapter_model.safetensors
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "train_config.json").write_text(config_json)
            torch.save({"step": step, "optimizer": optimizer_state, "scheduler": schedule.state_dict()},
                       tmp / "trainer_state.pt")
        # only this run's older checkpoints: never the one just written, never a later step's
        older = [c for c in list_checkpoints(output_dir) if (n := checkpoint_step(c)) is not None and n < step]
        for old in older[max(keep - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()                                          # distributed: the others wait until it is on disk
    return final


def checkpoint_step(checkpoint: Path) -> int | None:
    """N of checkpoint-N; None for a name that carries no step."""
    suffix = checkpoint.name[len(PREFIX):]
    return int(suffix) if suffix.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, newest first."""
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)), reverse=True)


# safetensors' header names for the dtypes a model's tensors can have
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def load_trainer_state(checkpoint: Path, trust_remote_code: bool = False) -> dict:
    """The trainer state of a whole checkpoint; otherwise raises an error that says what is wrong.
    Reads the weights' headers, not the weights; never unpickles code."""
    adapters = is_adapter(checkpoint)                  # --lora_r: the adapters on their base model
    for name in ("adapter_config.json" if adapters else "config.json", "train_config.json", "trainer_state.pt"):
        if not (checkpoint / name).is_file():
            raise ValueError(f"missing {name}")
    json.loads((checkpoint / "train_config.json").read_text())
    if adapters:
        expected, found = lora.expected_tensors(checkpoint, trust_remote_code), lora.saved_tensors(checkpoint)
    else:
        expected, found = expected_tensors(checkpoint, trust_remote_code), saved_tensors(checkpoint)
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing:
        raise ValueError(f"the weights lack {len(missing)} of the model's {len(expected)} tensors (e.g. {missing[0]})")
    if unexpected:
        raise ValueError(f"the weights hold {len(unexpected)} tensor(s) the model lacks (e.g. {unexpected[0]})")
    described_by = "adapter_config.json" if adapters else "config.json"
    for name, (shape, dtype) in expected.items():
        if found[name] != (shape, SAFETENSORS_DTYPES.get(dtype, str(dtype))):
            raise ValueError(f"{name} is {found[name][1]} {found[name][0]} in the weights; "
                             f"{described_by} makes it {SAFETENSORS_DTYPES.get(dtype, dtype)} {shape}")
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("trainer_state.pt has no integer 'step'")
    if not isinstance(state.get("optimizer"), dict) or not {"state", "param_groups"} <= state["optimizer"].keys():
        raise ValueError("trainer_state.pt has no 'optimizer' state dict (with 'state' and 'param_groups')")
    if not isinstance(state.get("scheduler"), dict) or not {"last_epoch", "base_lrs"} <= state["scheduler"].keys():
        raise ValueError("trainer_state.pt has no 'scheduler' state dict (with 'last_epoch' and 'base_lrs')")
    return state


def expected_tensors(checkpoint: Path, trust_remote_code: bool) -> dict[str, tuple[list[int], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor the weights file must hold for the model config.json describes:
    parameters and persistent buffers, a tied output embedding once under its first name (as save_pretrained
    and dist.full_state_dicts write it)."""
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    with torch.device("meta"):                              # the model's skeleton: shapes and dtypes, no memory
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: (list(t.shape), t.dtype) for name, t in model.state_dict().items() if name in kept}


def saved_tensors(checkpoint: Path) -> dict[str, tuple[list[int], str]]:
    """{name: (shape, safetensors dtype)} from the header of model.safetensors, or of every shard its index
    names; opening a truncated file fails here."""
    index = checkpoint / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    found = {}
    for file in files:
        if not (checkpoint / file).is_file():
            raise ValueError(f"missing {file}")
        with safe_open(checkpoint / file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                found[name] = (tensor.get_shape(), tensor.get_dtype())
    return found


def candidates(path: Path) -> list[Path]:
    """The checkpoints a resume from `path` tries, newest first: `path` itself if it is one, else those in it."""
    return [path] if path.name.startswith(PREFIX) else list_checkpoints(path)


def find_resumable(path: Path, trust_remote_code: bool = False) -> tuple[Path, dict] | None:
    """(checkpoint, trainer_state) for the newest whole checkpoint at `path`, which may be an output
    directory or one checkpoint; None when there is none. Each unusable one is reported in one line."""
    for checkpoint in candidates(path):
        try:
            return checkpoint, load_trainer_state(checkpoint, trust_remote_code)
        except Exception as e:  # any failure to read means: not usable, try the one before
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            print(f"skipping unusable checkpoint {checkpoint}: {reason[:300]}")
    return None
