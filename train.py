"""Train a causal LM to call tools with GRPO and ToolRL's reward (Qian et al. 2025).

    python train.py                                    # tiny local model on the demo set: CPU, 3-4 minutes
    python train.py --model Qwen2.5-1.5B-Instruct      # the paper's recipe on its ToolRL data, one GPU
    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B-Instruct --fsdp   # data-parallel (grpo/dist.py)

One step: take B prompts; sample G completions each (grpo/rollout.py); score each with ToolRL's reward
(rewards/); turn rewards into group-relative advantages (grpo/loss.py); compute old and reference
log-probs once; then `steps_per_generation` optimizer steps of the clipped surrogate + beta * k3 KL,
each over its share of the B*G completions, in micro-batches whose gradients add up to the full
mini-batch's (the loss is divided by the mini-batch's token count, fixed before the first backward).

Kept from the paper's run: G = 4, 512 prompts per rollout in 4 mini-batches, lr 1e-6 constant,
clip 0.2, entropy bonus 0.001, temperature 1.0, 2,048 + 1,024 tokens, 15 epochs = 105 steps.
Changed: the KL term sits in the loss (k3, DeepSeekMath) rather than in the reward (see grpo/loss.py).
Dropped: PPO's value model, vLLM, multi-turn tool execution (ToolRL is single-step).
"""
import json
import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from data import DownloadError, build_prompts, load_examples
from grpo import checkpoint as ckpt
from grpo import cli, dist, lora
from grpo.cli import FALSE_WORDS, TRUE_WORDS, config_json, field, parse_config
from grpo.io import atomic_path, atomic_write_text, remove
from grpo.logprobs import CompletionLogprobs
from grpo.loss import group_advantages, grpo_token_loss, masked_sum, zero_std_fraction
from grpo.model import (bf16_autocast, check_model_source, load_model, load_tokenizer, resolve_model_name,
                        set_checkpointing, use_bf16)
from grpo.report import StepLog, plot_rewards, trend
from grpo.rollout import (NonFiniteLogits, Rollout, decode_completions, eos_token_ids, generate_rollout, left_pad,
                          pad_token_id)
from grpo.tracking import CHOICES as TRACKERS
from grpo.tracking import missing_package, open_tracker
from rewards import RewardConfig
from rewards.custom import DEFAULT as DEFAULT_REWARD
from rewards.custom import load_reward_fn, reward_terms, score_completions


@dataclass
class Config:
    """GRPO for tool calling. Defaults are ToolRL's recipe; `--model tiny` applies TINY_PRESET first."""
    # model and data
    model: str = field("tiny", "HF model dir, hub id, bare name (Qwen2.5-1.5B-Instruct), or 'tiny' (built locally)")
    data: str = field("auto", "'toolrl', 'demo', or a data file; 'auto' = demo for --model tiny, else toolrl")
    data_split: str | None = field(None, "train/test split of --data (toolrl, demo, ToolRL raw JSON); "
                                         "default: train for toolrl and demo, the whole file otherwise")
    output_dir: str = field("runs/grpo", "where metrics, samples and checkpoints go")
    seed: int = field(42, "seed for the prompt order and sampling")
    resume: str | None = field(None, "output dir or checkpoint to continue from (newest usable checkpoint); "
                                     "--resume = --output_dir on a dir with no checkpoint yet starts fresh")
    overwrite_output_dir: bool = field(False, "delete the run already in --output_dir (checkpoints, metrics, "
                                              "samples, plot, sft-init, eval, tracker files) before starting a "
                                              "fresh one")
    allow_config_change: bool = field(False, "let --resume continue with values that change the run's course (a "
                                             "new --learning_rate, ...); they take effect and metrics.jsonl logs them")
    skip_bad_rows: bool = field(False, "drop data rows that fail their checks (each listed) instead of stopping")
    trust_remote_code: bool = field(False, "allow model code from the hub (off: only transformers' own code runs)")
    cpu_threads: int = field(0, "torch's CPU threads (0: its default, one per core)")
    bf16: str = field("auto", "bf16 autocast over float32 master weights and AdamW state, and a bf16 reference model "
                              "(rollout, log-probs, update, warm start, eval); auto = on for CUDA, off on a CPU",
                      choices=["auto", "true", "false"])
    # rollout
    prompts_per_step: int = field(512, "prompts per rollout batch (B)")
    num_generations: int = field(4, "completions per prompt (G); advantages are relative within these")
    max_prompt_length: int = field(2048, "prompt tokens kept (longer prompts lose their start)")
    max_new_tokens: int = field(1024, "completion tokens at most; longer completions are truncated")
    temperature: float = field(1.0, "sampling temperature; log-probs use the same one")
    generation_batch_size: int = field(256, "sequences per generate call (halved automatically on OOM)")
    compile_generation: bool = field(False, "generate on a static KV cache with a torch.compile'd decode step "
                                            "(no shared prefix, no early exit of finished rows; docs/PERFORMANCE.md)")
    # reward: ToolRL's three ablation axes (rewards/toolrl.py), or your own function
    reward_fn: str = field(DEFAULT_REWARD, "reward as module:function with toolrl_reward's signature and return "
                                           "shape; every term but 'total' is logged as rewards/<term> (rewards/custom.py)")
    reward_length: str = field("none", "length reward", choices=["none", "fixed", "dynamic"])
    reward_scale: str = field("original", "reward scale", choices=["original", "equal_max", "two_stage", "dynamic"])
    reward_granularity: str = field("original", "correctness granularity",
                                    choices=["original", "finegrained", "intermediate", "coarse"])
    # optimisation
    max_steps: int = field(105, "rollout batches to train on (the paper: 15 epochs of 7 = 105)")
    steps_per_generation: int = field(4, "optimizer steps per rollout batch (mini-batches); >1 makes the ratio matter")
    micro_batch_size: int = field(8, "sequences per forward/backward; lower it on out-of-memory")
    learning_rate: float = field(1e-6, "AdamW learning rate (peak of the schedule)")
    lr_scheduler_type: str = field("constant", "learning-rate schedule after the warm-up, over --max_steps",
                                   choices=["constant", "linear", "cosine"])
    warmup_steps: int = field(0, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = field(0.01, "AdamW weight decay")
    max_grad_norm: float = field(1.0, "gradient-norm clip")
    epsilon: float = field(0.2, "clip range below 1 for the ratio")
    epsilon_high: float = field(0.2, "clip range above 1 (DAPO's clip-higher when > epsilon)")
    beta: float = field(0.001, "KL coefficient; 0 skips the reference model entirely")
    entropy_coef: float = field(0.001, "entropy bonus coefficient")
    scale_rewards: bool = field(True, "divide advantages by the group std (false: Dr. GRPO)")
    gradient_checkpointing: bool = field(True, "recompute activations in backward (training forward only)")
    logprob_chunk_size: int = field(1024, "completion tokens per LM-head chunk")
    skip_zero_advantage: bool = field(True, "skip forward/backward of zero-advantage completions when beta = 0 "
                                             "and entropy_coef = 0 (their loss is exactly 0); one rank only")
    max_bad_steps: int = field(3, "abort after this many non-finite steps in a row")
    # distributed: `torchrun --nproc_per_node N train.py ...` runs data-parallel (grpo/dist.py)
    fsdp: bool = field(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2) "
                              "instead of keeping a whole copy per rank (DDP)")
    # LoRA through peft (grpo/lora.py): low-rank adapters train, the model's own weights stay frozen
    lora_r: int = field(0, "LoRA rank r: train adapters W + (lora_alpha / r) B A on --lora_target_modules instead of "
                           "every weight, and take reference log-probs with the adapters off (no second model); "
                           "0 = off (full fine-tuning). Checkpoints then hold the adapters (peft's format)")
    lora_alpha: float = field(32.0, "LoRA scale numerator: the adapters add (lora_alpha / lora_r) B A x")
    lora_target_modules: str = field(lora.TARGETS, "comma-separated names of the decoder's linear layers that get "
                                                   "adapters (not lm_head / embed_tokens)")
    merge_lora: bool = field(False, "with --lora_r: at the end also write merged/, the model with the adapters folded "
                                    "into its weights (an HF model directory; no peft needed to load it)")
    # supervised warm start (also the paper's SFT400 baselines)
    sft_data: str | None = field(None, "data for supervised steps on its targets before GRPO (a file, toolrl-sft, "
                                       "demo, or demo-sft: the demo's train prompts answered by an imperfect teacher)")
    sft_steps: int = field(0, "supervised optimizer steps before GRPO")
    sft_batch_size: int = field(16, "examples per supervised step")
    sft_learning_rate: float = field(1e-5, "learning rate of the supervised warm start")
    sft_lr_scheduler_type: str = field("constant", "warm start's learning-rate schedule after its warm-up",
                                       choices=["constant", "linear", "cosine"])
    sft_warmup_steps: int = field(0, "warm start's steps of linear learning-rate warm-up from 0")
    # logging and checkpoints
    save_every: int = field(20, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = field(2, "checkpoints kept on disk (oldest removed)")
    log_samples_every: int = field(10, "write a few completions with their rewards every N steps")
    report_to: str = field("none", "also send metrics, config and samples to this tracker (grpo/tracking.py)",
                           choices=TRACKERS)
    # held-out evaluation at the end (eval.py's code: greedy decoding, the toolrl metrics)
    eval_data: str = field("auto", "held-out set on which the start, warm-start and final models are compared at "
                                   "the end: 'demo' (its test split), 'toolrl' (its test split), a ToolRL-format "
                                   "file, or 'none'; 'auto' = the test split of --data when it has one")
    eval_every: int = field(10, "also evaluate the policy in memory on --eval_data every N GRPO steps and at the last "
                                "(eval/... metrics, time/eval); 0 = only the end-of-run comparison")
    eval_limit: int = field(0, "first N rows of --eval_data, during training and at the end; 0 = all")


# `--model tiny`: a CPU-sized run of the same code. Fields given on the command line win.
TINY_PRESET = dict(
    data="demo", prompts_per_step=16, num_generations=8, max_prompt_length=512, max_new_tokens=96,
    temperature=1.0, max_steps=30, steps_per_generation=2, micro_batch_size=64, learning_rate=2e-4, beta=0.0,
    entropy_coef=0.0, gradient_checkpointing=False, sft_data="demo-sft", sft_steps=600, sft_batch_size=16,
    sft_learning_rate=3e-3, save_every=10, log_samples_every=10, cpu_threads=2,
)


# The fields a --resume may change freely: where files go, how often to save, log and evaluate, and memory or
# speed knobs that leave the math as it was (--fsdp too: any number of ranks, sharded or not, resumes any
# checkpoint). Any other difference from the checkpoint's config changes the run's course, and needs
# --allow_config_change. (--max_steps also moves a decaying schedule: compared then.)
FREE_ON_RESUME = {"output_dir", "resume", "overwrite_output_dir", "allow_config_change", "trust_remote_code",
                  "cpu_threads", "fsdp", "generation_batch_size", "compile_generation", "micro_batch_size",
                  "gradient_checkpointing", "logprob_chunk_size", "save_every", "keep_checkpoints",
                  "log_samples_every", "eval_data", "max_steps", "report_to", "eval_every", "eval_limit", "merge_lora"}
NOT_IN_CONFIG_FILE = ("resume", "overwrite_output_dir", "allow_config_change")   # what to do, not what the run is


def help_defaults() -> dict[str, str]:
    """--help shows what a bare `python train.py` uses (the tiny preset) beside the paper's recipe."""
    return {name: f"default: {value} (the tiny preset); paper's recipe: {getattr(Config, name)}"
            for name, value in TINY_PRESET.items()}


def configure(argv=None) -> Config:
    """Parse the command line, apply the tiny preset, resolve 'auto', and check every value before any
    model is loaded: a bad value stops with one line naming its flag (exit code 2)."""
    cfg, given = parse_config(Config, argv, help_defaults(), config_file=True, ignored_in_file=NOT_IN_CONFIG_FILE,
                              prog="train.py")
    if cfg.model == "tiny":
        cfg = replace(cfg, **{k: v for k, v in TINY_PRESET.items() if k not in given})
        if "sft_data" not in given and cfg.data not in ("auto", "demo"):
            cfg = replace(cfg, sft_data=cfg.data)          # `--model tiny --data FILE`: warm-start on FILE too
    if cfg.data == "auto":
        cfg = replace(cfg, data="demo" if cfg.model == "tiny" else "toolrl")
    if cfg.data == "demo-sft":
        fail("--data demo-sft: its targets are a teacher's, for --sft_data; the reward needs gold calls: --data demo")
    if cfg.data_split is None and cfg.data in ("toolrl", "demo"):
        cfg = replace(cfg, data_split="train")
    if cfg.eval_data == "auto":
        cfg = replace(cfg, eval_data=cfg.data if cfg.data in ("toolrl", "demo") else "none")
    if cfg.eval_data == "none" and cfg.eval_every > 0:  # (a negative value is refused below)
        if "eval_every" in given:
            fail(f"--eval_every {cfg.eval_every} needs a held-out set: --eval_data is none")
        cfg = replace(cfg, eval_every=0)            # the default's, with nothing to evaluate
    for name in ("prompts_per_step", "max_prompt_length", "max_new_tokens", "generation_batch_size",
                 "max_steps", "steps_per_generation", "micro_batch_size", "logprob_chunk_size",
                 "save_every", "keep_checkpoints", "log_samples_every", "max_bad_steps", "sft_batch_size"):
        if getattr(cfg, name) <= 0:
            fail(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("learning_rate", "sft_learning_rate", "weight_decay", "beta", "entropy_coef", "epsilon",
                 "epsilon_high", "sft_steps", "warmup_steps", "sft_warmup_steps", "cpu_threads", "eval_every",
                 "eval_limit"):
        if getattr(cfg, name) < 0:                  # NaN and inf were refused while parsing (grpo/cli.py)
            fail(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    W, cores = dist.world_size(), len(os.sched_getaffinity(0))   # ranks (1 in a plain run); cores we may use
    checks = [
        (cfg.num_generations >= 2, f"--num_generations must be >= 2 for group-relative advantages, got {cfg.num_generations}"),
        (cfg.temperature > 0, f"--temperature must be > 0 for sampling, got {cfg.temperature}"),
        (cfg.max_grad_norm > 0, f"--max_grad_norm must be > 0, got {cfg.max_grad_norm}"),
        (cfg.cpu_threads <= cores, f"--cpu_threads {cfg.cpu_threads}: this machine lets the run use {cores} core(s)"),
        # each rank (one in a plain run) takes an equal share of the prompts and splits its completions into
        # --steps_per_generation equal mini-batches
        (cfg.prompts_per_step % W == 0 and cfg.prompts_per_step // W * cfg.num_generations % cfg.steps_per_generation == 0,
         f"--prompts_per_step ({cfg.prompts_per_step}) must split evenly over the {W} ranks, and each rank's "
         f"completions into --steps_per_generation ({cfg.steps_per_generation}) equal mini-batches"),
        (dist.launched() or not cfg.fsdp, "--fsdp shards over torchrun's processes: torchrun --nproc_per_node N train.py"),
        (cfg.lora_r >= 0, f"--lora_r must be >= 0 (0 = off), got {cfg.lora_r}"),
        (cfg.lora_alpha > 0, f"--lora_alpha must be > 0, got {cfg.lora_alpha}"),
        (bool(lora.target_names(cfg.lora_target_modules)) and not set(lora.target_names(cfg.lora_target_modules))
         & set(lora.UNREACHABLE), f"--lora_target_modules {cfg.lora_target_modules!r}: name at least one linear layer "
                                  f"of the decoder; {' and '.join(lora.UNREACHABLE)} cannot take adapters here"),
        (not (cfg.fsdp and cfg.lora_r), "--fsdp with --lora_r: not supported (sharding frozen weights next to "
                                        "trained adapters is not implemented here); use DDP: drop --fsdp"),
        (cfg.lora_r or not cfg.merge_lora, "--merge_lora needs --lora_r > 0 (there are no adapters to merge)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    if message := missing_package(cfg.report_to):
        fail(message)
    try:
        load_reward_fn(cfg.reward_fn)               # imports it now: a bad path fails before any model loads
    except ValueError as e:
        fail(str(e))
    if cfg.lora_r:
        try:
            lora.require_peft()
        except ImportError:
            fail("--lora_r needs peft: pip install peft")
    if cfg.model != "tiny":
        try:
            resolve_model_name(cfg.model)
        except ValueError as e:
            fail(str(e))
        context = _model_context_length(cfg.model)
        if context and cfg.max_prompt_length + cfg.max_new_tokens > context:
            fail(f"--max_prompt_length {cfg.max_prompt_length} + --max_new_tokens {cfg.max_new_tokens} "
                 f"exceeds the model's {context} positions: no room for completion tokens")
    return cfg


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
    eval_items = None
    if cfg.eval_data != "none":                     # eval.py's own loader (toolrl: downloaded now)
        from eval import BENCHMARKS
        config = heldout_config(cfg, device="cpu")
        eval_items = load("eval_data", cfg.eval_data, lambda: BENCHMARKS[config.benchmarks].load(config))
    return examples, sft_examples, eval_items


fail = partial(cli.fail, "train.py")   # one line on stderr, exit code 2


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
            if lora.is_adapter(resumed[0]) != bool(cfg.lora_r):
                fail(f"--resume {resumed[0]} holds {'LoRA adapters' if lora.is_adapter(resumed[0]) else 'full weights'}"
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


def _model_context_length(model: str) -> int | None:
    """max_position_embeddings from a local model directory's config.json (None for hub ids: not fetched yet)."""
    path = Path(model) / "config.json"
    return json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None


def lr_factor(kind: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """Learning rate at `step` over the base rate: linear warm-up from 0 over `warmup_steps`, then constant, or
    a linear or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]


class BadSteps:
    """The one place non-finite values are handled, for the warm start and GRPO alike: a step that met NaN or inf
    (weights, sampling logits, rewards, loss or gradient) is skipped and counted; after `limit` such steps in a
    row, `record` says to stop. No checkpoint is written while the weights may be broken."""

    def __init__(self, limit: int):
        self.limit, self.problems = limit, []               # the current run of bad steps

    def record(self, problem: str | None, step: int) -> bool:
        """problem: what was non-finite at this step (None: nothing). True when the run must stop."""
        if problem is None:
            self.problems = []
            return False
        self.problems.append(problem)
        tqdm.write(f"step {step}: non-finite {problem}: skipped ({len(self.problems)} in a row)")
        return len(self.problems) >= self.limit

    @property
    def weights_broken(self) -> bool:
        """Skipped gradients leave the weights as they were; NaN/inf weights or logits mean they are lost."""
        return any(p.startswith(("weights", "logits", "loss")) for p in self.problems)


def finite_weights(model) -> bool:
    """Every weight finite, in one host sync. distributed: FSDP's shards are checked on every rank, together."""
    bad = torch.stack([~(p.to_local() if hasattr(p, "to_local") else p).isfinite().all() for p in model.parameters()])
    return dist.sum_over_ranks(bad.sum()).item() == 0


def sft_warm_start(cfg: Config, examples: list, policy: CompletionLogprobs, tokenizer, autocast, start: int = 0,
                   seconds: float | None = None) -> int:
    """Supervised steps on ground truths: -mean log p(ground truth + EOS | prompt), completion tokens only.

    Runs steps start, start+1, ... of the data order (a function of the seed): `cfg.sft_steps` of them, or with
    `seconds`, as many as fit in that wall time (bench/sft_control.py: supervised steps instead of GRPO).
    A step with a non-finite loss or gradient is skipped (BadSteps); --max_bad_steps in a row stop the run.
    Returns the number of steps taken."""
    prompts, _ = build_prompts(tokenizer, examples, cfg.max_prompt_length)
    targets = [tokenizer(e.ground_truth, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for e in examples]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_learning_rate, weight_decay=cfg.weight_decay)
    # with `seconds` (the control) the number of steps is unknown in advance: the base rate, constant
    schedule = LambdaLR(optimizer, partial(lr_factor, cfg.sft_lr_scheduler_type, cfg.sft_warmup_steps, cfg.sft_steps)
                        if seconds is None else lambda step: 1.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed))
    device = next(policy.parameters()).device
    t0, step, bad = time.perf_counter(), start, BadSteps(cfg.max_bad_steps)
    bar = tqdm(total=cfg.sft_steps if seconds is None else None, desc="warm start (supervised)")
    while (step < start + cfg.sft_steps) if seconds is None else (time.perf_counter() - t0 < seconds):
        idx = [order[(step * cfg.sft_batch_size + i) % len(examples)].item() for i in range(cfg.sft_batch_size)]
        prompt_ids, prompt_mask = left_pad([prompts[i] for i in idx], pad_token_id(tokenizer))     # (b, P)
        T = max(len(targets[i]) for i in idx)
        target_ids = torch.tensor([targets[i] + [pad_token_id(tokenizer)] * (T - len(targets[i])) for i in idx])
        target_mask = torch.tensor([[t < len(targets[i]) for t in range(T)] for i in idx])         # (b, T)
        ids = torch.cat([prompt_ids, target_ids], 1).to(device)
        attn = torch.cat([prompt_mask, target_mask.long()], 1).to(device)
        with autocast():
            logp, _ = policy(ids, attn, target_mask.to(device))                                    # (b, T)
        loss = -masked_sum(logp, target_mask.to(device)) / target_mask.sum()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if torch.isfinite(grad_norm):                      # a non-finite loss has a non-finite gradient too
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # broken weights show here too, in the next step's loss: no pass over the weights is needed
        problem = None if torch.isfinite(grad_norm) else "loss or gradient in the warm start"
        schedule.step()
        if bad.record(problem, step + 1):
            raise SystemExit(f"aborting the warm start: {len(bad.problems)} steps in a row met a non-finite value; "
                             f"nothing was saved. Try a lower --sft_learning_rate (now {cfg.sft_learning_rate}).")
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
        step += 1
    bar.close()
    return step - start


@torch.no_grad()
def rollout_logprobs(policy: CompletionLogprobs, rollout: Rollout, cfg: Config, autocast) -> torch.Tensor:
    """log pi(token) for every completion token of the rollout, without gradients: (N, T), 0 off-mask."""
    out = torch.zeros(rollout.completion_mask.shape, device=rollout.input_ids.device)
    for start in range(0, len(out), cfg.micro_batch_size):
        mb = rollout.select(slice(start, start + cfg.micro_batch_size))
        with autocast():
            logp, _ = policy(mb.input_ids, mb.attention_mask, mb.completion_mask, cfg.temperature)
        out[start:start + len(logp), :logp.shape[1]] = logp
    return out


def policy_update(policy, optimizer, rollout: Rollout, advantages, old_logp, ref_logp, cfg: Config,
                  autocast) -> dict:
    """`steps_per_generation` optimizer steps over equal shares of the rollout; returns mean statistics."""
    N = len(advantages)
    rows_per_step = N // cfg.steps_per_generation
    # With no KL and no entropy term, a zero-advantage row's loss is exactly 0: skip its forward/backward.
    # distributed: not with several ranks, which must all run the same micro-batches (FSDP communicates in each).
    skip_flat = cfg.skip_zero_advantage and cfg.beta == 0 and cfg.entropy_coef == 0 and dist.world_size() == 1
    totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0, "skipped": 0}
    for k in range(cfg.steps_per_generation):
        rows = torch.arange(k * rows_per_step, (k + 1) * rows_per_step, device=advantages.device)
        # Every row counts, fixed before backward. distributed: the count of all ranks' rows together.
        n_tokens = dist.sum_over_ranks(rollout.completion_mask[rows].sum()).clamp(min=1)
        if skip_flat:
            rows = rows[advantages[rows] != 0] if (advantages[rows] != 0).any() else rows[:1]
        micro_batches = rows.split(cfg.micro_batch_size)
        for i, micro in enumerate(micro_batches):
            mb = rollout.select(micro)
            t = mb.completion_mask.shape[1]
            # distributed: DDP all-reduces gradients in the backward of the step's last micro-batch only
            with autocast(), dist.no_sync(policy, sync=i == len(micro_batches) - 1):
                logp, entropy = policy(mb.input_ids, mb.attention_mask, mb.completion_mask, cfg.temperature)
            # One optimizer step per rollout: on-policy, so old = current (ratio 1, clipping inactive).
            old = logp.detach() if cfg.steps_per_generation == 1 else old_logp[micro, :t]
            ref = ref_logp[micro, :t] if ref_logp is not None else None
            token_loss, parts = grpo_token_loss(logp, old, advantages[micro], cfg.epsilon, cfg.epsilon_high,
                                                ref, cfg.beta, entropy, cfg.entropy_coef)
            # distributed: DDP and FSDP average gradients over ranks, so each rank's loss is multiplied by the
            # number of ranks: their average is then the whole batch's loss, and its gradient the single-process one.
            loss = masked_sum(token_loss, mb.completion_mask) / n_tokens * dist.world_size()
            loss.backward()
            scale = dist.world_size() / (n_tokens.item() * cfg.steps_per_generation)   # distributed: as the loss
            totals["loss"] += loss.item() / cfg.steps_per_generation
            totals["kl"] += masked_sum(parts["kl"], mb.completion_mask).item() * scale
            totals["entropy"] += masked_sum(entropy.detach(), mb.completion_mask).item() * scale
            totals["clip_fraction"] += masked_sum(parts["clipped"], mb.completion_mask).item() * scale
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:                           # a NaN/inf step would poison the weights: skip it (BadSteps reports it)
            totals["skipped"] += 1
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] += grad_norm.item() / cfg.steps_per_generation
    return totals


def stop_non_finite(cfg: Config, out: Path, step: int, model, tokenizer, optimizer, schedule, bad: BadSteps,
                    start: str):
    """--max_bad_steps steps in a row met NaN/inf: save the weights if they are still good (skipped steps left
    them as they were), and stop with one message. `start`: the model this run's GRPO steps started from."""
    rates = f"--learning_rate (now {cfg.learning_rate})"
    if not bad.weights_broken:
        path = ckpt.save_checkpoint(out, step, model, tokenizer, optimizer, schedule, config_json(cfg),
                                    cfg.keep_checkpoints)
        where = f"the weights from before them are saved in {path}"
    else:                                # they blew up: the last good ones are those saved before
        newest = ckpt.list_checkpoints(out)
        where = (f"the weights themselves give NaN/inf, so they were not saved; the last good ones are in "
                 f"{newest[0] if newest else start + ' (no checkpoint was saved yet)'}")
        if not newest and cfg.sft_steps:           # the warm start may have broken them
            rates += f" or --sft_learning_rate (now {cfg.sft_learning_rate})"
    raise SystemExit(f"aborting: {len(bad.problems)} steps in a row met a non-finite value (skipped); {where}. "
                     f"Try a lower {rates}.")


def heldout_config(cfg: Config, device: str, models=(), output_dir: Path | str = "", bf16: bool = False):
    """eval.py's config for --eval_data: the demo or toolrl benchmark (a file is scored as toolrl), with the run's
    generation and prompt lengths, --eval_limit and precision."""
    from eval import EvalConfig
    return EvalConfig(model=list(models), benchmarks="demo" if cfg.eval_data == "demo" else "toolrl",
                      output_dir=str(output_dir), limit=cfg.eval_limit,
                      toolrl_data="" if cfg.eval_data in ("demo", "toolrl") else cfg.eval_data,
                      max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_length, device=device,
                      bf16="true" if bf16 else "false", trust_remote_code=cfg.trust_remote_code,
                      skip_bad_rows=cfg.skip_bad_rows)


def evaluate_policy(model, tokenizer, items: list, config) -> dict[str, float]:
    """--eval_every: the policy as it is in memory answers the held-out `items` greedily, scored and summarised by
    eval.py's own code -> {"eval/<metric>": value, "time/eval": seconds}. generate_text switches the model to
    eval() without gradient checkpointing for the generation and restores both after (grpo/rollout.py)."""
    from eval import BENCHMARKS, generate
    t0 = time.perf_counter()
    benchmark = BENCHMARKS[config.benchmarks]
    outputs = generate(model, tokenizer, items, config, progress=False)   # its line follows the step's; no bar
    rows = [benchmark.score(item, output) for item, output in zip(items, outputs)]
    return {**{f"eval/{k}": v for k, v in benchmark.summarize(rows).items()}, "time/eval": time.perf_counter() - t0}


def evaluate_heldout(cfg: Config, models: dict[str, str], items: list | None, output_dir: Path, device: str,
                     bf16: bool) -> dict[str, float] | None:
    """The paper's comparison in miniature: each of `models` ({label: path}) answers the held-out `items`
    (load_data's) greedily, scored by eval.py's own code (predictions and summary in output_dir, as
    `python eval.py --model ...` writes them). Prints one row per model; returns {label: exact match}."""
    if cfg.eval_data == "none":
        return None
    from eval import evaluate, paper_table, plain
    config = heldout_config(cfg, device, models.values(), output_dir, bf16)
    benchmark = config.benchmarks
    summary = evaluate(config, {benchmark: items})
    print(f"\nheld-out {cfg.eval_data} set, greedy ({output_dir}):\n"
          + plain(paper_table(summary, benchmark, {path: label for label, path in models.items()})))
    return {label: summary[path][benchmark]["exact_match"] for label, path in models.items()}


def main(argv=None):
    """Train; Ctrl-C ends with one line: the step reached, the newest checkpoint, and the command that continues.
    No checkpoint is saved then: the state in the middle of a step is not a consistent one."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = configure(argv)
    if cfg.model != "tiny":                   # a path that is not there, or the hub out of reach: stop in seconds
        try:
            check_model_source(cfg.model)
        except ValueError as e:
            fail(str(e))
    data = load_data(cfg)                     # a bad file stops here, before any model is loaded
    resumed, changes = resume_point(cfg)      # before anything is written: every rank decides on the same files
    progress = {"step": resumed[1]["step"] if resumed else 0}
    try:
        train(cfg, data, resumed, changes, progress)
    except KeyboardInterrupt:
        newest = ckpt.list_checkpoints(Path(cfg.output_dir))
        print(f"\ninterrupted at step {progress['step']}/{cfg.max_steps}; newest checkpoint: "
              f"{newest[0] if newest else 'no checkpoint yet'}; continue with: "
              f"{continue_command(argv, cfg.output_dir)}", file=sys.stderr)
        raise SystemExit(130)      # 128 + SIGINT, as a shell reports it


def train(cfg: Config, data: tuple[list, list | None, list | None], resumed: tuple[Path, dict] | None, changes: dict,
          progress: dict):
    """The run: warm start, then the GRPO loop; `progress["step"]` counts the steps done. `data`: load_data's;
    `resumed`, `changes`: resume_point's."""
    dist.setup()                    # distributed: join torchrun's process group; other ranks than 0 print nothing
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and dist.rank() == 0:
        delete_run(out)
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {out} (its whole config: {out / 'train_config.json'})")
    if changes:
        print("resuming with changed values: " + ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items()))
    if dist.rank() == 0:            # distributed: rank 0 alone writes files (here and below)
        atomic_write_text(out / "train_config.json", config_json(cfg))
    torch.manual_seed(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 compute with float32 master weights and AdamW state (trap 7), on the device's own autocast; --bf16
    # auto: on for CUDA, plain float32 on a CPU.
    bf16 = use_bf16(cfg.bf16, device)
    autocast = bf16_autocast(device, bf16)

    # ---- model, reference, data
    model_path = cfg.model
    if cfg.model == "tiny":
        from grpo.tiny import DEMO_MODEL, save_tiny_model
        model_path = str(out / "tiny-init")
        if dist.rank() == 0 and not Path(model_path, "config.json").is_file():
            save_tiny_model(model_path, **DEMO_MODEL)
        dist.barrier()
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    examples, sft_examples, eval_items = data
    prompts, n_truncated = build_prompts(tokenizer, examples, cfg.max_prompt_length)
    if cfg.resume and resumed is None:
        print(f"--resume {cfg.resume}: no checkpoint there yet; starting from step 0")
    ref_path = str(out / "sft-init") if cfg.sft_steps > 0 else model_path   # the policy GRPO starts from
    # a LoRA checkpoint holds the adapters only: they are loaded (below) onto the model GRPO started from
    start = ref_path if resumed and cfg.lora_r else str(resumed[0]) if resumed else model_path
    model = load_model(start, device=device, trust_remote_code=cfg.trust_remote_code)
    if cfg.lora_r and (missing := lora.missing_targets(model, cfg.lora_target_modules)):
        fail(f"--lora_target_modules: no linear layer named {', '.join(missing)} in the model's decoder")
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    model.train()
    policy = CompletionLogprobs(model, cfg.logprob_chunk_size)
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)

    if cfg.sft_steps > 0:          # the reference is the policy GRPO starts from: after the warm start
        if not resumed:
            sft_warm_start(cfg, sft_examples, policy, tokenizer, autocast)   # every rank: the same steps and data
            if dist.rank() == 0:
                with atomic_path(ref_path) as tmp:          # whole or not at all (grpo/io.py)
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
            dist.barrier()
    peft_model = None     # --lora_r: adapters go into `model` in place after the warm start (which trains all weights)
    if cfg.lora_r:
        peft_model = lora.add_adapters(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, ref_path,
                                       resumed[0] if resumed else None)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LoRA r={cfg.lora_r}: {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters train")
    ref_policy = None
    if cfg.beta > 0 and cfg.lora_r:          # the same weights with the adapters off: no second copy
        ref_policy = lora.WithoutAdapters(policy, peft_model)
    elif cfg.beta > 0:
        ref_model = load_model(ref_path, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                               trust_remote_code=cfg.trust_remote_code).eval().requires_grad_(False)
        ref_policy = CompletionLogprobs(ref_model, cfg.logprob_chunk_size)

    policy = dist.wrap(policy, cfg.fsdp)    # distributed: DDP, or FSDP2 with --fsdp (shards `model` in place)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],   # LoRA: the adapters only
                                  lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    saved_model = peft_model if cfg.lora_r else model                  # LoRA: checkpoints hold the adapters (peft's format)
    start_step = 0
    if resumed:
        dist.load_optimizer_state(model, optimizer, resumed[1]["optimizer"])   # saved by any number of ranks
        start_step = resumed[1]["step"]
        print(f"resumed from {resumed[0]} at step {start_step}")
    # --lr_scheduler_type: torch's LambdaLR over lr_factor, saved in every checkpoint's trainer state and restored
    # from it. The rates come from this command, not from the optimizer state just loaded: after a resume with
    # --allow_config_change the schedule is built anew at the checkpoint's step, so a new --learning_rate runs.
    for group in optimizer.param_groups:
        group.update(weight_decay=cfg.weight_decay, initial_lr=cfg.learning_rate)
    schedule = LambdaLR(optimizer, partial(lr_factor, cfg.lr_scheduler_type, cfg.warmup_steps, cfg.max_steps),
                        last_epoch=start_step - 1)
    # a step skipped for NaN/inf advances the schedule without an optimizer step: as meant, not worth a warning
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    if resumed and not changes:
        schedule.load_state_dict(resumed[1]["scheduler"])

    B, G = cfg.prompts_per_step, cfg.num_generations
    steps_per_epoch = len(prompts) // B
    reward_cfg = RewardConfig(length=cfg.reward_length, scale=cfg.reward_scale, granularity=cfg.reward_granularity)
    reward_fn = load_reward_fn(cfg.reward_fn)
    print(f"{len(prompts)} prompts ({n_truncated} truncated), {steps_per_epoch} steps per epoch | "
          f"{B} x {G} = {B * G} completions per step, {cfg.steps_per_generation} optimizer steps per rollout, "
          f"up to {B * G * cfg.max_new_tokens:,} completion tokens per step | device {device} x {dist.world_size()}")
    tracker = open_tracker(cfg.report_to, out, asdict(cfg), start_step) if dist.rank() == 0 else None
    log = StepLog(out, cfg.max_steps, start_step, tracker) if dist.rank() == 0 else None
    bad, start_model = BadSteps(cfg.max_bad_steps), str(resumed[0]) if resumed else ref_path
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="GRPO steps", unit="step", disable=dist.rank() > 0)
    eval_config = heldout_config(cfg, device)      # --eval_every: every rank evaluates (FSDP gathers on all)

    # ---- the loop: sample -> score -> advantages -> update -> log -> save
    for step in range(start_step, cfg.max_steps):
        progress["step"] = step
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_000 + step * 1_000 + dist.rank())  # sampling: (seed, step, rank)
        epoch, position = divmod(step, steps_per_epoch)     # the prompt order is a function of (seed, epoch)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = dist.shard(order[position * B:(position + 1) * B].tolist())  # distributed: this rank's B / ranks
        learning_rate = schedule.get_last_lr()[0]
        # Non-finite weights, or logits that become NaN/inf while sampling, skip the step (BadSteps).
        problem = None if finite_weights(model) else "weights"
        if problem is None:
            try:
                # bf16 (--bf16), as the update computes: decoding reads half the bytes of the float32 master
                # weights, and autocast casts each weight once per rollout (its cache lives as long as this
                # block). distributed: FSDP gathers its shards once for the whole rollout.
                with dist.full_weights(policy), autocast():
                    rollout = generate_rollout(model, [prompts[i] for i in batch], num_generations=G,
                                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                               eos_ids=eos_ids, pad_id=pad_id, batch_size=cfg.generation_batch_size,
                                               compile=cfg.compile_generation)
            except NonFiniteLogits:
                problem = "logits while sampling"
        # distributed: logits differ by rank; if any rank met NaN/inf, every rank skips (the update is collective)
        if dist.sum_over_ranks(torch.tensor(float(problem is not None), device=device)).item() > 0:
            bar.update()
            schedule.step()
            if bad.record(problem or "logits while sampling (on another rank)", step + 1):
                stop_non_finite(cfg, out, step + 1, saved_model, tokenizer, optimizer, schedule, bad, start_model)
            continue
        t1 = time.perf_counter()

        completions = decode_completions(tokenizer, rollout)                                     # B*G strings
        truths = [examples[i].ground_truth for i in batch for _ in range(G)]
        scores = score_completions(reward_fn, completions, truths, step, reward_cfg)             # B*G dicts
        rewards = torch.tensor([s["total"] for s in scores])                                    # (N,)
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards).to(device)           # (N,)
        t2 = time.perf_counter()

        old_logp = rollout_logprobs(policy, rollout, cfg, autocast) if cfg.steps_per_generation > 1 else None
        ref_logp = rollout_logprobs(ref_policy, rollout, cfg, autocast) if ref_policy else None
        try:
            stats = policy_update(policy, optimizer, rollout, advantages, old_logp, ref_logp, cfg, autocast)
        except torch.OutOfMemoryError as e:
            raise SystemExit(f"out of memory in the update: lower --micro_batch_size (now {cfg.micro_batch_size}), "
                             f"--max_new_tokens or --max_prompt_length") from e
        t3 = time.perf_counter()
        heldout = {}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            with dist.full_weights(policy), autocast():          # as the rollout: whole weights, bf16 on GPU
                heldout = evaluate_policy(model, tokenizer, eval_items, eval_config)

        lengths = rollout.completion_mask.sum(1).float()
        all_rewards = dist.gather(rewards)                  # distributed: every rank's, for whole-batch statistics
        metrics = {
            "step": step + 1, "epoch": epoch,
            "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
            **reward_terms(scores),                         # rewards/<term>: each named term's mean
            "frac_reward_zero_std": zero_std_fraction(all_rewards, G),
            "completion_length": lengths.mean().item(),
            "clipped_ratio": rollout.truncated.float().mean().item(),
            **stats, "learning_rate": learning_rate,
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
            "tokens_per_second": rollout.attention_mask.sum().item() / (t3 - t0),
            **heldout,                                      # eval/... and time/eval on --eval_every steps
        }
        if device == "cuda":
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if step == start_step and changes:
            metrics["config_change"] = changes             # a resume with --allow_config_change: what changed
        metrics = dist.mean_over_ranks(metrics)             # distributed: per-rank shares -> the whole batch's
        schedule.step()
        bar.update()
        if log:                                             # distributed: rank 0 alone logs
            log.write(metrics)
            if (step + 1) % cfg.log_samples_every == 0 or step == start_step:
                log.samples(step + 1, [examples[batch[0]].messages[-1]["content"]] * G,   # the first prompt's G
                            completions[:G], truths[:G], scores[:G])

        # NaN rewards make a NaN loss with good weights; a NaN loss from finite advantages is the weights' doing
        problem = ("rewards" if not torch.isfinite(all_rewards).all() else "loss" if not math.isfinite(metrics["loss"])
                   else "gradient" if metrics["skipped"] else None)
        if bad.record(problem, step + 1):
            stop_non_finite(cfg, out, step + 1, saved_model, tokenizer, optimizer, schedule, bad, start_model)
        if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps) and not bad.weights_broken:
            ckpt.save_checkpoint(out, step + 1, saved_model, tokenizer, optimizer, schedule, config_json(cfg),
                                 cfg.keep_checkpoints)
    bar.close()
    progress["step"] = cfg.max_steps
    if dist.rank() == 0:
        if cfg.merge_lora:                                  # the adapters folded in (done training: in place)
            lora.save_merged(peft_model, tokenizer, out / "merged")
            print(f"merged model (base + adapters): {out / 'merged'}")
        final = ckpt.list_checkpoints(out)[0]
        models = {f"untrained ({Path(model_path).name})": model_path}
        if cfg.sft_steps:
            models[f"warm start ({Path(ref_path).name})"] = ref_path
        models[f"GRPO ({final.name})"] = str(final)
        exact = evaluate_heldout(cfg, models, eval_items, out / "eval", device, bf16)
        plot = plot_rewards(out, exact)
        print(trend(out))
        print(f"\nnewest checkpoint: {final}\nmetrics: {out / 'metrics.jsonl'}"
              + (f"\nreward curves: {plot}" if plot else "")
              + (f"\nheld-out predictions: {out / 'eval'}" if exact else ""))
        log.close()


if __name__ == "__main__":
    main()
