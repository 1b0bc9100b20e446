"""Train a causal LM to call tools with GRPO and ToolRL's reward (Qian et al. 2025).

    python train.py                                    # tiny local model on the demo set: CPU, ~3 minutes
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
import shlex
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from data import build_prompts, load_examples
from grpo import checkpoint as ckpt
from grpo import dist
from grpo.cli import FALSE_WORDS, TRUE_WORDS, config_json, field, parse_config
from grpo.io import atomic_path, atomic_write_text, remove
from grpo.logprobs import CompletionLogprobs
from grpo.loss import group_advantages, grpo_token_loss, masked_sum, zero_std_fraction
from grpo.model import load_model, load_tokenizer, resolve_model_name, set_checkpointing
from grpo.report import StepLog, plot_rewards, trend
from grpo.rollout import Rollout, decode_completions, eos_token_ids, generate_rollout, left_pad, pad_token_id
from rewards import RewardConfig, toolrl_reward


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
                                              "samples, plot, sft-init, eval) before starting a fresh one")
    trust_remote_code: bool = field(False, "allow model code from the hub (off: only transformers' own code runs)")
    cpu_threads: int = field(0, "torch's CPU threads (0: its default, one per core)")
    # rollout
    prompts_per_step: int = field(512, "prompts per rollout batch (B)")
    num_generations: int = field(4, "completions per prompt (G); advantages are relative within these")
    max_prompt_length: int = field(2048, "prompt tokens kept (longer prompts lose their start)")
    max_new_tokens: int = field(1024, "completion tokens at most; longer completions are truncated")
    temperature: float = field(1.0, "sampling temperature; log-probs use the same one")
    generation_batch_size: int = field(256, "sequences per generate call (halved automatically on OOM)")
    compile_generation: bool = field(False, "generate on a static KV cache with a torch.compile'd decode step "
                                            "(no shared prefix, no early exit of finished rows; docs/PERFORMANCE.md)")
    # reward: ToolRL's three ablation axes (rewards/toolrl.py)
    reward_length: str = field("none", "length reward", choices=["none", "fixed", "dynamic"])
    reward_scale: str = field("original", "reward scale", choices=["original", "equal_max", "two_stage", "dynamic"])
    reward_granularity: str = field("original", "correctness granularity",
                                    choices=["original", "finegrained", "intermediate", "coarse"])
    # optimisation
    max_steps: int = field(105, "rollout batches to train on (the paper: 15 epochs of 7 = 105)")
    steps_per_generation: int = field(4, "optimizer steps per rollout batch (mini-batches); >1 makes the ratio matter")
    micro_batch_size: int = field(8, "sequences per forward/backward; lower it on out-of-memory")
    learning_rate: float = field(1e-6, "AdamW learning rate (constant)")
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
    # supervised warm start (also the paper's SFT400 baselines)
    sft_data: str | None = field(None, "data for supervised steps on ground truths before GRPO")
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
    # held-out evaluation at the end (eval.py's code: greedy decoding, the toolrl metrics)
    eval_data: str = field("auto", "held-out set on which the start, warm-start and final models are compared at "
                                   "the end: 'demo' (its test split), 'toolrl' (its test split), a ToolRL-format "
                                   "file, or 'none'; 'auto' = the test split of --data when it has one")


# `--model tiny`: a CPU-sized run of the same code. Fields given on the command line win.
TINY_PRESET = dict(
    data="demo", prompts_per_step=16, num_generations=8, max_prompt_length=512, max_new_tokens=96,
    temperature=1.0, max_steps=30, steps_per_generation=2, micro_batch_size=64, learning_rate=2e-4, beta=0.0,
    entropy_coef=0.0, gradient_checkpointing=False, sft_data="demo", sft_steps=600, sft_batch_size=16,
    sft_learning_rate=3e-3, save_every=10, log_samples_every=10, cpu_threads=2,
)


def configure(argv=None) -> Config:
    """Parse the command line, apply the tiny preset, resolve 'auto', and check every value before any
    model is loaded (a bad value fails fast, naming its flag)."""
    cfg, given = parse_config(Config, argv)
    if cfg.model == "tiny":
        cfg = replace(cfg, **{k: v for k, v in TINY_PRESET.items() if k not in given})
    if cfg.data == "auto":
        cfg = replace(cfg, data="demo" if cfg.model == "tiny" else "toolrl")
    if cfg.data_split is None and cfg.data in ("toolrl", "demo"):
        cfg = replace(cfg, data_split="train")
    if cfg.eval_data == "auto":
        cfg = replace(cfg, eval_data=cfg.data if cfg.data in ("toolrl", "demo") else "none")
    for name in ("prompts_per_step", "max_prompt_length", "max_new_tokens", "generation_batch_size",
                 "max_steps", "steps_per_generation", "micro_batch_size", "logprob_chunk_size",
                 "save_every", "keep_checkpoints", "log_samples_every", "max_bad_steps", "sft_batch_size"):
        if getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name} must be positive, got {getattr(cfg, name)}")
    W = dist.world_size()                                   # distributed: ranks (1 in a plain run)
    checks = [
        (cfg.num_generations >= 2, f"--num_generations must be >= 2 for group-relative advantages, got {cfg.num_generations}"),
        (cfg.temperature > 0, f"--temperature must be > 0 for sampling, got {cfg.temperature}"),
        (cfg.sft_steps >= 0, f"--sft_steps must be >= 0, got {cfg.sft_steps}"),
        (cfg.cpu_threads >= 0, f"--cpu_threads must be >= 0, got {cfg.cpu_threads}"),
        (min(cfg.learning_rate, cfg.weight_decay, cfg.beta, cfg.entropy_coef, cfg.epsilon, cfg.epsilon_high) >= 0,
         "--learning_rate, --weight_decay, --beta, --entropy_coef, --epsilon, --epsilon_high must be >= 0"),
        # each rank (one in a plain run) takes an equal share of the prompts and splits its completions into
        # --steps_per_generation equal mini-batches
        (cfg.prompts_per_step % W == 0 and cfg.prompts_per_step // W * cfg.num_generations % cfg.steps_per_generation == 0,
         f"--prompts_per_step ({cfg.prompts_per_step}) must split evenly over the {W} ranks, and each rank's "
         f"completions into --steps_per_generation ({cfg.steps_per_generation}) equal mini-batches"),
        (dist.launched() or not cfg.fsdp, "--fsdp shards over torchrun's processes: torchrun --nproc_per_node N train.py"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(message)
    for name in ("data", "sft_data", "eval_data"):
        source = getattr(cfg, name)
        if name == "eval_data" and source == "none":
            continue
        if source and source not in ("demo", "toolrl", "toolrl-sft") and not Path(source).exists():
            raise SystemExit(f"--{name} {source!r}: no such file (or use 'demo' / 'toolrl' / 'toolrl-sft')")
    if cfg.model != "tiny":
        try:
            resolve_model_name(cfg.model)
        except ValueError as e:
            raise SystemExit(str(e))
        context = _model_context_length(cfg.model)
        if context and cfg.max_prompt_length + cfg.max_new_tokens > context:
            raise SystemExit(f"--max_prompt_length {cfg.max_prompt_length} + --max_new_tokens {cfg.max_new_tokens} "
                             f"exceeds the model's {context} positions: no room for completion tokens")
    return cfg


def fail(message: str):
    """Stop with one line on stderr and exit code 2 (argparse's convention for a bad command line)."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# What a run writes into --output_dir (tiny-init/ is the same for every run and stays)
RUN_FILES = ("train_config.json", "metrics.jsonl", "samples.jsonl", "reward_curves.png", "sft-init", "eval")


def holds_run(out: Path) -> bool:
    return ((out / "train_config.json").exists() or (out / "metrics.jsonl").exists()
            or bool(ckpt.list_checkpoints(out)))


def resume_point(cfg: Config) -> tuple[Path, dict] | None:
    """Decide, before anything is written, where this run starts; fail (changing nothing) when it cannot.

    A fresh run never writes into a directory that holds a run, unless --overwrite_output_dir. --resume
    continues from the newest usable checkpoint; with none at all there (a scheduler's restart loop: the same
    command with --resume from the first second of the job) it starts fresh; with checkpoints of which none is
    usable, or a --resume path that does not exist (other than the output dir itself), it stops."""
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
    resume_path = Path(cfg.resume).resolve() if cfg.resume else None
    own_run = resume_path is not None and out.resolve() in (resume_path, resume_path.parent)   # this dir's run
    if resumed is None and not own_run and not cfg.overwrite_output_dir and holds_run(out):
        fail(f"{out} holds a run; continue it with --resume {out}, or delete it and start over with "
             f"--overwrite_output_dir")
    return resumed


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


def sft_warm_start(cfg: Config, policy: CompletionLogprobs, tokenizer, autocast, start: int = 0,
                   seconds: float | None = None) -> int:
    """Supervised steps on ground truths: -mean log p(ground truth + EOS | prompt), completion tokens only.

    Runs steps start, start+1, ... of the data order (a function of the seed): `cfg.sft_steps` of them, or with
    `seconds`, as many as fit in that wall time (bench/sft_control.py: supervised steps instead of GRPO).
    Returns the number of steps taken."""
    examples = load_examples(cfg.sft_data, split="train" if cfg.sft_data in ("toolrl", "demo") else None)
    prompts, _ = build_prompts(tokenizer, examples, cfg.max_prompt_length)
    targets = [tokenizer(e.ground_truth, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for e in examples]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.sft_learning_rate, weight_decay=cfg.weight_decay)
    # with `seconds` (the control) the number of steps is unknown in advance: the base rate, constant
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg.sft_lr_scheduler_type,
                                                                    cfg.sft_warmup_steps, cfg.sft_steps)) \
        if seconds is None else None
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg.seed))
    device = next(policy.parameters()).device
    t0, step = time.perf_counter(), start
    bar = tqdm(total=cfg.sft_steps if seconds is None else None, desc="sft")
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
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule:
            schedule.step()
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
    bar = tqdm(total=N, desc="update", leave=False)
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
            bar.update(len(micro))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:                                              # a NaN/inf step would poison the weights: skip it
            totals["skipped"] += 1
            print(f"non-finite gradient norm ({grad_norm.item()}): optimizer step skipped")
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] += grad_norm.item() / cfg.steps_per_generation
    bar.close()
    return totals


def evaluate_heldout(cfg: Config, models: dict[str, str], output_dir: Path, device: str) -> dict[str, float] | None:
    """The paper's comparison in miniature: each of `models` ({label: path}) answers the held-out split greedily,
    scored by eval.py's own code (predictions and summary in output_dir, as `python eval.py --model ...` writes
    them). Prints one row per model; returns {label: exact match}."""
    if cfg.eval_data == "none":
        return None
    from eval import EvalConfig, evaluate, paper_table, plain
    benchmark = "demo" if cfg.eval_data == "demo" else "toolrl"
    config = EvalConfig(model=list(models.values()), benchmarks=benchmark, output_dir=str(output_dir),
                        toolrl_data="" if cfg.eval_data in ("demo", "toolrl") else cfg.eval_data,
                        max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_length, device=device,
                        trust_remote_code=cfg.trust_remote_code)
    summary = evaluate(config)
    print(f"\nheld-out {cfg.eval_data} set, greedy ({output_dir}):\n"
          + plain(paper_table(summary, benchmark, {path: label for label, path in models.items()})))
    return {label: summary[path][benchmark]["exact_match"] for label, path in models.items()}


def main(argv=None):
    """Train; Ctrl-C ends with one line: the step reached, the newest checkpoint, and the command that continues.
    No checkpoint is saved then: the state in the middle of a step is not a consistent one."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = configure(argv)
    resumed = resume_point(cfg)     # before anything is written: every rank decides on the same files
    progress = {"step": resumed[1]["step"] if resumed else 0}
    try:
        train(cfg, resumed, progress)
    except KeyboardInterrupt:
        newest = ckpt.list_checkpoints(Path(cfg.output_dir))
        print(f"\ninterrupted at step {progress['step']}/{cfg.max_steps}; newest checkpoint: "
              f"{newest[0] if newest else 'no checkpoint yet'}; continue with: "
              f"{continue_command(argv, cfg.output_dir)}", file=sys.stderr)
        raise SystemExit(130)      # 128 + SIGINT, as a shell reports it


def train(cfg: Config, resumed: tuple[Path, dict] | None, progress: dict):
    """The run: warm start, then the GRPO loop; `progress["step"]` counts the steps done."""
    dist.setup()                    # distributed: join torchrun's process group; other ranks than 0 print nothing
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and dist.rank() == 0:
        delete_run(out)
    dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    print(config_json(cfg))
    if dist.rank() == 0:            # distributed: rank 0 alone writes files (here and below)
        atomic_write_text(out / "train_config.json", config_json(cfg))
    torch.manual_seed(cfg.seed)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 compute on GPU with float32 master weights and AdamW state (trap 7); plain float32 on CPU.
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")  # noqa: E731

    # ---- model, reference, data
    model_path = cfg.model
    if cfg.model == "tiny":
        from grpo.tiny import DEMO_MODEL, save_tiny_model
        model_path = str(out / "tiny-init")
        if dist.rank() == 0 and not Path(model_path, "config.json").is_file():
            save_tiny_model(model_path, **DEMO_MODEL)
        dist.barrier()
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
    examples = load_examples(cfg.data, split=cfg.data_split)
    prompts, n_truncated = build_prompts(tokenizer, examples, cfg.max_prompt_length)
    if cfg.resume and resumed is None:
        print(f"--resume {cfg.resume}: no checkpoint there yet; starting from step 0")
    model = load_model(str(resumed[0]) if resumed else model_path, device=device,
                       trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        set_checkpointing(model, True)
    model.train()
    policy = CompletionLogprobs(model, cfg.logprob_chunk_size)
    eos_ids, pad_id = eos_token_ids(model, tokenizer), pad_token_id(tokenizer)

    ref_path = model_path
    if cfg.sft_steps > 0:          # the reference is the policy GRPO starts from: after the warm start
        ref_path = str(out / "sft-init")
        if not resumed:
            sft_warm_start(cfg, policy, tokenizer, autocast)          # every rank: the same steps on the same data
            if dist.rank() == 0:
                with atomic_path(ref_path) as tmp:          # whole or not at all (grpo/io.py)
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
            dist.barrier()
    ref_policy = None
    if cfg.beta > 0:
        ref_model = load_model(ref_path, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                               trust_remote_code=cfg.trust_remote_code).eval().requires_grad_(False)
        ref_policy = CompletionLogprobs(ref_model, cfg.logprob_chunk_size)

    policy = dist.wrap(policy, cfg.fsdp)    # distributed: DDP, or FSDP2 with --fsdp (shards `model` in place)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start_step = 0
    if resumed:
        dist.load_optimizer_state(model, optimizer, resumed[1]["optimizer"])   # saved by any number of ranks
        start_step = resumed[1]["step"]
        print(f"resumed from {resumed[0]} at step {start_step}")

    B, G = cfg.prompts_per_step, cfg.num_generations
    steps_per_epoch = len(prompts) // B
    assert steps_per_epoch > 0, f"--prompts_per_step {B} is more than the {len(prompts)} training prompts"
    reward_cfg = RewardConfig(length=cfg.reward_length, scale=cfg.reward_scale, granularity=cfg.reward_granularity)
    print(f"{len(prompts)} prompts ({n_truncated} truncated), {steps_per_epoch} steps per epoch | "
          f"{B} x {G} = {B * G} completions per step, {cfg.steps_per_generation} optimizer steps per rollout, "
          f"up to {B * G * cfg.max_new_tokens:,} completion tokens per step | device {device} x {dist.world_size()}")
    log = StepLog(out, cfg.max_steps, start_step) if dist.rank() == 0 else None
    bad_steps = 0

    # ---- the loop: sample -> score -> advantages -> update -> log -> save
    for step in range(start_step, cfg.max_steps):
        progress["step"] = step
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_000 + step * 1_000 + dist.rank())  # sampling: (seed, step, rank)
        epoch, position = divmod(step, steps_per_epoch)     # the prompt order is a function of (seed, epoch)
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batch = dist.shard(order[position * B:(position + 1) * B].tolist())  # distributed: this rank's B / ranks
        # bf16 on GPU, as the update computes: decoding reads half the bytes of the float32 master weights, and
        # autocast casts each weight once per rollout (its cache lives as long as this block).
        # distributed: FSDP gathers its shards once for the whole rollout.
        with dist.full_weights(policy), autocast():
            rollout = generate_rollout(model, [prompts[i] for i in batch], num_generations=G,
                                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       eos_ids=eos_ids, pad_id=pad_id, batch_size=cfg.generation_batch_size,
                                       compile=cfg.compile_generation)
        t1 = time.perf_counter()

        completions = decode_completions(tokenizer, rollout)                                     # B*G strings
        truths = [examples[i].ground_truth for i in batch for _ in range(G)]
        scores = [toolrl_reward(c, gt, step, reward_cfg) for c, gt in zip(completions, truths)]
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

        lengths = rollout.completion_mask.sum(1).float()
        all_rewards = dist.gather(rewards)                  # distributed: every rank's, for whole-batch statistics
        metrics = {
            "step": step + 1, "epoch": epoch,
            "reward": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
            **{f"rewards/{k}": sum(s[k] for s in scores) / len(scores) for k in ("format", "correctness", "length")},
            "frac_reward_zero_std": zero_std_fraction(all_rewards, G),
            "completion_length": lengths.mean().item(),
            "clipped_ratio": rollout.truncated.float().mean().item(),
            **stats, "learning_rate": optimizer.param_groups[0]["lr"],
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
            "tokens_per_second": rollout.attention_mask.sum().item() / (t3 - t0),
        }
        if device == "cuda":
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        metrics = dist.mean_over_ranks(metrics)             # distributed: per-rank shares -> the whole batch's
        if log:                                             # distributed: rank 0 alone logs
            log.write(metrics)
            if (step + 1) % cfg.log_samples_every == 0 or step == start_step:
                log.samples(step + 1, [examples[batch[0]].messages[-1]["content"]] * G,   # the first prompt's G
                            completions[:G], truths[:G], scores[:G])

        bad_steps = bad_steps + 1 if metrics["skipped"] or not math.isfinite(metrics["loss"]) else 0
        if bad_steps >= cfg.max_bad_steps:
            path = ckpt.save_checkpoint(out, step + 1, model, tokenizer, optimizer, config_json(cfg), cfg.keep_checkpoints)
            raise SystemExit(f"aborting: {bad_steps} steps in a row had a non-finite loss or gradient (skipped). "
                             f"Weights from before them are in {path}; try a lower --learning_rate.")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            ckpt.save_checkpoint(out, step + 1, model, tokenizer, optimizer, config_json(cfg), cfg.keep_checkpoints)
    progress["step"] = cfg.max_steps
    if dist.rank() == 0:
        final = ckpt.list_checkpoints(out)[0]
        models = {f"untrained ({Path(model_path).name})": model_path}
        if cfg.sft_steps:
            models[f"warm start ({Path(ref_path).name})"] = ref_path
        models[f"GRPO ({final.name})"] = str(final)
        exact = evaluate_heldout(cfg, models, out / "eval", device)
        print(f"reward curves: {plot_rewards(out, exact)}")
        print(trend(out))


if __name__ == "__main__":
    main()
