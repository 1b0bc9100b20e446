"""The run: what it reads before training (data, held-out set), where it starts (a fresh directory, or the newest
usable checkpoint of --resume), and what it says when stopped. Nothing here is GRPO; train.py calls it around the
loop. Every decision is made before anything is written, and a mistake stops with one line naming its flag."""
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

from data import DownloadError, load_examples
from data.formats import with_placeholder_thought
from grpo import checkpoint as ckpt
from grpo import dist
from grpo.cli import FALSE_WORDS, TRUE_WORDS, config_json
from grpo.config import FREE_ON_RESUME, Config, fail
from grpo.evaluation import BENCHMARKS, heldout_config
from grpo.io import remove
from grpo.model import is_adapter
from grpo.update import lr_schedule


def load_data(cfg: Config) -> tuple[list, list | None, list | None]:
    """(examples, warm-start examples, held-out items) of --data, --sft_data and --eval_data, all read before
    training: a bad held-out file stops the run now, not after it. A mistake stops with one line naming the flag."""
    def load(flag: str, source: str, read) -> list:
        try:
            examples = read()
        except (DownloadError, ValueError, FileNotFoundError, ImportError) as e:   # DownloadError: already one line
            fail(f"--{flag} {source}: {e}")
        if not examples:
            fail(f"--{flag} {source}: no usable rows")
        return examples

    def rows(source: str, split: str | None):
        return lambda: load_examples(source, split=split, skip_bad_rows=cfg.skip_bad_rows)

    examples = load("data", cfg.data, rows(cfg.data, cfg.data_split))
    if cfg.prompts_per_step > len(examples):
        fail(f"--prompts_per_step {cfg.prompts_per_step} is more than the {len(examples)} prompts of --data {cfg.data}")
    sft_examples = None
    if cfg.sft_steps:
        if not cfg.sft_data:
            fail(f"--sft_steps {cfg.sft_steps} needs --sft_data")
        if cfg.sft_data == cfg.data:                       # the same split as GRPO's prompts: train, never test
            sft_examples = examples
        else:
            sft_examples = load("sft_data", cfg.sft_data,
                                rows(cfg.sft_data, "train" if cfg.sft_data in ("toolrl", "demo") else None))
        if cfg.sft_placeholder_thought:
            sft_examples = [replace(e, ground_truth=with_placeholder_thought(e.ground_truth)) for e in sft_examples]
    eval_items = None
    if cfg.eval_data == "validation":               # for choosing a recipe: never the test split
        eval_items = load("eval_data", "validation", rows(cfg.data, "validation"))[:cfg.eval_limit or None]
    elif cfg.eval_data != "none":                   # eval.py's own loader (toolrl: downloaded now)
        config = heldout_config(cfg, device="cpu")
        eval_items = load("eval_data", cfg.eval_data, lambda: BENCHMARKS[config.benchmarks].load(config))
    return examples, sft_examples, eval_items


# What a run writes into --output_dir (tiny-init/ is the same for every run and stays)
RUN_FILES = ("train_config.json", "metrics.jsonl", "samples.jsonl", "reward_curves.png", "sft-init", "eval",
             "tensorboard", "wandb", "merged")


def holds_run(out: Path) -> bool:
    return ((out / "train_config.json").exists() or (out / "metrics.jsonl").exists()
            or bool(ckpt.list_checkpoints(out)))


def resume_point(cfg: Config) -> tuple[tuple[Path, dict] | None, dict]:
    """Decide, before anything is written, where this run starts; fail (changing nothing) when it cannot.

    A fresh run never writes into a directory that holds a run, unless --overwrite_output_dir. --resume
    continues from the newest usable checkpoint; with none at all there (a scheduler's restart loop: the same
    command with --resume from the first second of the job) it starts fresh; with checkpoints of which none is
    usable, or a --resume path that does not exist (other than the output dir itself), it stops.

    Returns ((checkpoint, trainer state) or None, {field: [saved, new]} of the config changes a resume makes:
    with any outside FREE_ON_RESUME it stops, unless --allow_config_change)."""
    out = Path(cfg.output_dir)
    if cfg.resume and cfg.overwrite_output_dir:
        fail("--resume and --overwrite_output_dir: choose one (continue the run, or delete it and start over)")
    resumed = None
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.exists() and path.resolve() != out.resolve():
            fail(f"--resume {cfg.resume}: no such file or directory")
        if tried := ckpt.candidates(path):
            resumed = ckpt.find_resumable(path, trust_remote_code=cfg.trust_remote_code)   # prints each reason
            if resumed is None:
                fail(f"--resume {cfg.resume}: none of its {len(tried)} checkpoint(s) is usable (each is named "
                     f"above with its reason); nothing was changed")
            if is_adapter(resumed[0]) != bool(cfg.lora_r):
                fail(f"--resume {resumed[0]} holds {'LoRA adapters' if is_adapter(resumed[0]) else 'full weights'}"
                     f": resume it with the --lora_r it was trained with")
    resume_path = Path(cfg.resume).resolve() if cfg.resume else None
    own_run = resume_path is not None and out.resolve() in (resume_path, resume_path.parent)   # this dir's run
    if resumed is None and not own_run and not cfg.overwrite_output_dir and holds_run(out):
        fail(f"{out} holds a run; continue it with --resume {out}, or delete it and start over with "
             f"--overwrite_output_dir")
    changes = config_changes(json.loads((resumed[0] / "train_config.json").read_text()), cfg) if resumed else {}
    if changes and not cfg.allow_config_change:
        fail(f"--resume {cfg.resume}: this command changes the run's course ("
             + "; ".join(f"--{k} {new} where {resumed[0].name} has {old}" for k, (old, new) in changes.items())
             + "): give the values it was saved with, or add --allow_config_change to continue with the new ones")
    return resumed, changes


def config_changes(saved: dict, cfg: Config) -> dict[str, list]:
    """{field: [saved value, new value]} for each field whose change alters the run's course (FREE_ON_RESUME)."""
    new = json.loads(config_json(cfg))
    free = FREE_ON_RESUME - ({"max_steps"} if cfg.lr_scheduler_type != "constant" else set())
    return {k: [saved[k], v] for k, v in new.items() if k in saved and k not in free and saved[k] != v}


def delete_run(out: Path) -> None:
    """--overwrite_output_dir: the earlier run's files, checkpoints included (also ones killed mid-write)."""
    for path in list(out.iterdir()) if out.is_dir() else []:
        if path.name in RUN_FILES or path.name.startswith((ckpt.PREFIX, f".tmp-{ckpt.PREFIX}")):
            remove(path)


def continue_command(argv: list[str], out: str) -> str:
    """The command line that continues this run: the same arguments, --resume OUT instead of any --resume or
    --overwrite_output_dir given."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":
            i += 2
            continue
        if arg == "--overwrite_output_dir":
            i += 2 if i + 1 < len(argv) and argv[i + 1].lower() in (*TRUE_WORDS, *FALSE_WORDS) else 1
            continue
        if not arg.startswith(("--resume=", "--overwrite_output_dir=")):
            kept.append(arg)
        i += 1
    return shlex.join(["python", "train.py", *kept, "--resume", out])


def prompt_batch(seed: int, step: int, num_prompts: int, batch_size: int) -> tuple[int, list[int]]:
    """(epoch, the indices of this rank's share of the step's prompts): each epoch is a permutation seeded by
    (seed, epoch), so a resumed run draws the same prompts at the same step without saving any sampler state."""
    epoch, position = divmod(step, num_prompts // batch_size)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + epoch))
    return epoch, dist.shard(order[position * batch_size:(position + 1) * batch_size].tolist())  # distributed


def optimizer(cfg: Config, model, resumed: tuple[Path, dict] | None, changes: dict):
    """(AdamW over the weights that train, the learning-rate schedule, the step to start from). A resumed run loads
    its checkpoint's optimizer state (saved by any number of ranks) and schedule state. The rates come from this
    command, not from the optimizer state: after a resume with --allow_config_change the schedule is built anew
    at the checkpoint's step, so that a new --learning_rate runs."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],   # LoRA: the adapters only
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start_step = resumed[1]["step"] if resumed else 0
    if resumed:
        dist.load_optimizer_state(model, optimizer, resumed[1]["optimizer"])
        print(f"resumed from {resumed[0]} at step {start_step}")
    for group in optimizer.param_groups:
        group.update(weight_decay=cfg.weight_decay, initial_lr=cfg.learning_rate)
    schedule = lr_schedule(optimizer, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps, start_step)
    if resumed and not changes:
        schedule.load_state_dict(resumed[1]["scheduler"])
    return optimizer, schedule, start_step


def interrupted(argv: list[str], cfg: Config, step: int) -> None:
    """Ctrl-C: one line with the step reached, the newest checkpoint and the command that continues; exit 130.
    No checkpoint is saved then: the state in the middle of a step is not a consistent one."""
    newest = ckpt.list_checkpoints(Path(cfg.output_dir))
    print(f"\ninterrupted at step {step}/{cfg.max_steps}; newest checkpoint: "
          f"{newest[0] if newest else 'no checkpoint yet'}; continue with: "
          f"{continue_command(argv, cfg.output_dir)}", file=sys.stderr)
    raise SystemExit(130)      # 128 + SIGINT, as a shell reports it
