"""train.py's one typed config: every field a flag with its help text, the tiny preset, and `configure`, which
turns a command line into a checked Config before any model or data is loaded (a bad value stops with one line
naming its flag, exit code 2)."""
import json
import os
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

from data.loaders import DEMO_SPLITS, SPLITS
from grpo import cli, dist, lora
from grpo.cli import field, parse_config
from grpo.model import resolve_model_name
from grpo.tracking import CHOICES as TRACKERS
from grpo.tracking import missing_package
from rewards.custom import DEFAULT as DEFAULT_REWARD
from rewards.custom import TOOLRL_TERMS, load_reward_fn, parse_reward_weights

fail = partial(cli.fail, "train.py")   # one line on stderr, exit code 2


@dataclass
class Config:
    """GRPO for tool calling. Defaults are ToolRL's recipe; `--model tiny` applies TINY_PRESET first, and
    `--model SmolLM2-135M-Instruct` without a GPU SMOLLM2_CPU_PRESET."""
    # model and data
    model: str = field("tiny", "HF model dir, hub id, bare name (Qwen2.5-1.5B-Instruct), or 'tiny' (built locally)")
    data: str = field("auto", "'toolrl', 'demo', or a data file; 'auto' = demo for --model tiny, else toolrl")
    data_split: str | None = field(None, "split of --data: train or test (toolrl, toolrl-sft, demo, a ToolRL raw "
                                         "JSON file), fit or validation (train's two parts: choose a recipe on "
                                         "validation, never test; data/loaders.py), validation (demo); default: "
                                         "train for toolrl and demo, the whole file otherwise")
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
    reward_weights: str = field("", "train on a weighted sum of the reward's terms: w_format,w_correctness[,w_length] "
                                    "for toolrl, or by name (format=1,correctness=2) for any --reward_fn whose total "
                                    "is the sum of its terms; a term given no weight weighs 1; logged terms stay "
                                    "unweighted; empty: the reward's own total")
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
    # GRPO's variants (grpo/loss.py's table; TRL's names and meanings)
    loss_type: str = field("dapo", "how token losses add up: dapo = sum over the optimizer step's tokens / their "
                                   "count (every token weighs the same); grpo = mean over each completion's tokens, "
                                   "then over completions (a long answer's tokens weigh less); dr_grpo = sum / "
                                   "(completions * max_new_tokens); bnpo = token mean per micro-batch (depends on "
                                   "--micro_batch_size)", choices=["dapo", "grpo", "dr_grpo", "bnpo"])
    importance_sampling_level: str = field("token", "clip the ratio per 'token' (PPO/GRPO) or per 'sequence' (GSPO: "
                                                    "exp of the mean log-ratio over the completion's tokens; its paper "
                                                    "uses --epsilon 3e-4 --epsilon_high 4e-4); the same on-policy",
                                           choices=["token", "sequence"])
    mask_truncated_completions: bool = field(False, "completions with no EOS within --max_new_tokens leave the loss "
                                                    "(DAPO's overlong filtering); they keep their reward and their "
                                                    "place in the group's advantages; frac_masked_truncated logs their share")
    top_entropy_quantile: float = field(1.0, "only the micro-batch's top-q fraction of tokens by entropy carry the "
                                             "policy loss and entropy bonus (the KL stays on all); 1.0 = all tokens, "
                                             "0.2 = Wang et al. 2025's")
    gradient_checkpointing: bool = field(True, "recompute activations in backward (training forward only)")
    logprob_chunk_size: int = field(1024, "completion tokens per LM-head chunk")
    shared_prompt: bool = field(True, "run each group's prompt once in the update and the old/reference log-prob "
                                      "passes, its G completions against its keys and values (grpo/shared_prefix.py; "
                                      "same result); false: every completion with its whole prompt")
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
    sft_packing: bool = field(True, "warm start on packed rows (grpo/packing.py): whole sequences end to end, no "
                                    "compute on padding (same result); false: one left/right-padded batch per step")
    sft_placeholder_thought: bool = field(False, "warm start on targets whose <think>...</think> is ToolRL's short "
                                                 "placeholder thought (the RL data's format), calls kept: the SFT "
                                                 "file's long thoughts make a small model loop inside them")
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
                                   "the end: 'demo' (its test split), 'toolrl' (its test split), 'validation' (that "
                                   "split of --data: for choosing a recipe), a ToolRL-format file, or 'none'; "
                                   "'auto' = the test split of --data when it has one")
    eval_every: int = field(10, "also evaluate the policy in memory on --eval_data every N GRPO steps and at the last "
                                "(eval/... metrics, time/eval); 0 = only the end-of-run comparison")
    eval_limit: int = field(0, "first N rows of --eval_data, during training and at the end; 0 = all")


# `--model tiny`: a CPU-sized run of the same code. Fields given on the command line win.
TINY_PRESET = dict(
    data="demo", prompts_per_step=16, num_generations=8, max_prompt_length=512, max_new_tokens=96,
    temperature=1.0, max_steps=30, steps_per_generation=2, micro_batch_size=64, learning_rate=2e-4, beta=0.0,
    entropy_coef=0.0, gradient_checkpointing=False, sft_data="demo-sft", sft_steps=1200, sft_batch_size=16,
    # lr 5e-3 after 30 warm-up steps, on 10,000 train prompts: the tiny model learns to copy values on every seed
    # tried; copying digits forms late, at a step set by the seed (begun by step 800 on seeds 42, 1, 2 and 4 with
    # the demo's lettered tool list, not by 2,000 on seed 3; docs/DEMO.md, "Why digits form late")
    sft_learning_rate=5e-3, sft_warmup_steps=30, save_every=10, log_samples_every=10, cpu_threads=2,
    # the demo's ~250-token sequences: one padded batch of 16 (1.25x the real positions) beats packed rows, which
    # run one forward each (15 warm-start steps on 2 threads: 9.4 s padded, 17.5 s packed; docs/PERFORMANCE.md)
    sft_packing=False,
)


# What a bare `python train.py` scores over seeds 42, 1, 2, 3 and 4 at 1 and 2 threads (the same digits at both;
# bench/seeds.py, docs/DEMO.md): exact match on the demo's test split, lowest and highest. Float sums differ between
# CPUs, and a tiny model's trajectory amplifies that, so a newcomer's digits differ from the README's; these ranges
# say what is typical.
DEMO_SPREAD = {"warm start": (0.00, 0.00), "GRPO": (43.96, 83.52)}
# what may differ from the demo's recipe and leave DEMO_SPREAD its range: the seed, where files go, threads, logging,
# and the speed knobs that change rounding only (which is what the spread is made of)
NOT_THE_RECIPE = ("seed", "output_dir", "overwrite_output_dir", "resume", "allow_config_change", "cpu_threads",
                  "save_every", "keep_checkpoints", "log_samples_every", "report_to", "eval_every",
                  "generation_batch_size", "micro_batch_size", "logprob_chunk_size", "shared_prompt", "sft_packing",
                  "gradient_checkpointing", "compile_generation")


def demo_spread(cfg: Config) -> dict[str, tuple[float, float]] | None:
    """DEMO_SPREAD for a run of the demo's own recipe (`python train.py` with any of NOT_THE_RECIPE); else None."""
    demo = configure([])
    same = all(getattr(cfg, f.name) == getattr(demo, f.name) for f in fields(Config) if f.name not in NOT_THE_RECIPE)
    return DEMO_SPREAD if same else None


# `--model SmolLM2-135M-Instruct` on a machine without CUDA: a real pretrained model on 2 CPU cores in about an hour
# (docs/REAL_MODEL.md). Raw, it never writes the format (no group has any variance: nothing for GRPO), so a
# supervised warm start on ToolRL's SFT file, with the RL data's short placeholder thought, comes first; then GRPO
# on the same file's prompts. Both use its "fit" part: "validation" is for choosing this recipe, test for the table.
# One group per micro-batch: its prompt once and its completions end to end, no padding at all (grpo/shared_prefix.py).
SMOLLM2_CPU_PRESET = dict(
    data="toolrl-sft", data_split="fit", sft_data="toolrl-sft", sft_placeholder_thought=True, eval_data="toolrl",
    prompts_per_step=4, num_generations=4, max_prompt_length=2048, max_new_tokens=160, temperature=1.0,
    max_steps=20, steps_per_generation=1, micro_batch_size=4, learning_rate=1e-5, beta=0.0, entropy_coef=0.0,
    gradient_checkpointing=False, bf16="true", sft_steps=48, sft_batch_size=4, sft_learning_rate=1e-4,
    sft_lr_scheduler_type="linear", save_every=5, eval_every=0, log_samples_every=5, cpu_threads=2,
)
SMOLLM2_NAMES = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")


def preset(model: str) -> dict:
    """The preset `--model` brings (fields given on the command line win): the tiny one, SmolLM2's on a CPU, or none."""
    import torch
    if model == "tiny":
        return TINY_PRESET
    if model in SMOLLM2_NAMES and not torch.cuda.is_available():
        return SMOLLM2_CPU_PRESET
    return {}


# The fields a --resume may change freely: where files go, how often to save, log and evaluate, and memory or
# speed knobs that leave the math as it was (--fsdp too: any number of ranks, sharded or not, resumes any
# checkpoint). Any other difference from the checkpoint's config changes the run's course, and needs
# --allow_config_change. (--max_steps also moves a decaying schedule: compared then.)
FREE_ON_RESUME = {"output_dir", "resume", "overwrite_output_dir", "allow_config_change", "trust_remote_code",
                  "cpu_threads", "fsdp", "generation_batch_size", "compile_generation", "micro_batch_size",
                  "gradient_checkpointing", "logprob_chunk_size", "shared_prompt", "sft_packing", "save_every",
                  "keep_checkpoints", "log_samples_every", "eval_data", "max_steps", "report_to", "eval_every", "eval_limit", "merge_lora"}
NOT_IN_CONFIG_FILE = ("resume", "overwrite_output_dir", "allow_config_change")   # what to do, not what the run is


def help_defaults() -> dict[str, str]:
    """--help shows what a bare `python train.py` uses (the tiny preset) and SmolLM2's CPU preset beside the
    paper's recipe."""
    shown = {}
    for name in {**TINY_PRESET, **SMOLLM2_CPU_PRESET}:
        parts = [f"default: {TINY_PRESET[name]} (the tiny preset)" if name in TINY_PRESET else
                 f"default: {getattr(Config, name)}"]
        if name in SMOLLM2_CPU_PRESET:
            parts.append(f"SmolLM2-135M-Instruct on a CPU: {SMOLLM2_CPU_PRESET[name]}")
        if name in TINY_PRESET:
            parts.append(f"paper's recipe: {getattr(Config, name)}")
        shown[name] = "; ".join(parts)
    return shown


def configure(argv=None) -> Config:
    """Parse the command line, apply the tiny preset, resolve 'auto', and check every value before any
    model is loaded: a bad value stops with one line naming its flag (exit code 2)."""
    cfg, given = parse_config(Config, argv, help_defaults(), config_file=True, ignored_in_file=NOT_IN_CONFIG_FILE,
                              prog="train.py")
    if values := preset(cfg.model):
        cfg = replace(cfg, **{k: v for k, v in values.items() if k not in given})
        if "sft_data" not in given and cfg.data not in ("auto", values["data"]):
            cfg = replace(cfg, sft_data=cfg.data)          # `--data FILE`: warm-start on (the same split of) FILE too
    if cfg.data == "auto":
        cfg = replace(cfg, data="demo" if cfg.model == "tiny" else "toolrl")
    if cfg.data == "demo-sft":
        fail("--data demo-sft: its targets are a teacher's, for --sft_data; the reward needs gold calls: --data demo")
    if cfg.data_split is None and cfg.data in ("toolrl", "demo"):
        cfg = replace(cfg, data_split="train")
    splits = {"demo": DEMO_SPLITS, "toolrl": SPLITS}.get(cfg.data, SPLITS)   # a file: ToolRL raw JSON's split
    if cfg.data_split is not None and cfg.data_split not in splits:
        fail(f"--data_split {cfg.data_split}: --data {cfg.data} has the splits {', '.join(splits)}")
    if cfg.eval_data == "auto":
        cfg = replace(cfg, eval_data=cfg.data if cfg.data in ("toolrl", "demo") else "none")
    rest = "train" if cfg.data == "demo" else "fit"           # --data's split that leaves its validation rows out
    if cfg.eval_data == "validation" and cfg.data_split != rest:
        fail(f"--eval_data validation: train on the rest of --data {cfg.data} (--data_split {rest}), not "
             f"--data_split {cfg.data_split}, which holds it")
    if cfg.eval_data == "none" and cfg.eval_every > 0:  # (a negative value is refused below)
        if "eval_every" in given:
            fail(f"--eval_every {cfg.eval_every} needs a held-out set: --eval_data is none")
        cfg = replace(cfg, eval_every=0)            # the default's, with nothing to evaluate
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    """Stop with one line naming the flag at the first value that cannot work: ranges, combinations, and what
    must be installed or importable (the reward function, peft, a tracker) or fit the model (its context)."""
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
        (0 <= cfg.top_entropy_quantile <= 1, f"--top_entropy_quantile must be in [0, 1], got {cfg.top_entropy_quantile}"),
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
        reward_weights(cfg)
    except ValueError as e:
        fail(str(e))
    if cfg.lora_r:
        try:
            lora.require_peft()
        except ImportError:
            fail("--lora_r needs peft: pip install peft")
    if cfg.model != "tiny":
        try:
            path = resolve_model_name(cfg.model)      # a GGUF file: its converted directory (grpo/gguf.py)
        except ValueError as e:
            fail(str(e))
        context = model_context_length(path)
        if context and cfg.max_prompt_length + cfg.max_new_tokens > context:
            fail(f"--max_prompt_length {cfg.max_prompt_length} + --max_new_tokens {cfg.max_new_tokens} "
                 f"exceeds the model's {context} positions: no room for completion tokens")


def saved_config(values: dict) -> Config:
    """The Config of a run's train_config.json (its values, as a dict): keys that are no field are ignored, fields
    the file lacks (added since) keep their defaults."""
    return Config(**{f.name: values[f.name] for f in fields(Config) if f.name in values})


def reward_weights(cfg: Config) -> dict[str, float] | None:
    """--reward_weights as {term: weight} (None: the reward's own total); ToolRL's terms may be given by position."""
    return parse_reward_weights(cfg.reward_weights, TOOLRL_TERMS if cfg.reward_fn == DEFAULT_REWARD else None)


def model_context_length(model: str) -> int | None:
    """max_position_embeddings from a local model directory's config.json (None for hub ids: not fetched yet)."""
    path = Path(model) / "config.json"
    return json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None
