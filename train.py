"""Train a causal LM to call tools with GRPO and ToolRL's reward (Qian et al. 2025).

    python train.py                                    # tiny local model on the demo set: CPU, about 6 minutes
    python train.py --model Qwen2.5-1.5B-Instruct      # the paper's recipe on its ToolRL data, one GPU
    python train.py --model SmolLM2-135M-Instruct      # a real model on 2 CPU cores, ~50 minutes (docs/REAL_MODEL.md)
    torchrun --nproc_per_node 8 train.py --model Qwen2.5-7B-Instruct --fsdp   # data-parallel (grpo/dist.py)

One step: take B prompts; sample G completions each (grpo/rollout.py); score each with ToolRL's reward
(rewards/); turn rewards into group-relative advantages (grpo/loss.py); compute old and reference
log-probs once; then `steps_per_generation` optimizer steps of the clipped surrogate + beta * k3 KL
(grpo/update.py). The file reads top to bottom: setup, the loop, the end of the run, main().

Kept from the paper's run: G = 4, 512 prompts per rollout in 4 mini-batches, lr 1e-6 constant,
clip 0.2, entropy bonus 0.001, temperature 1.0, 2,048 + 1,024 tokens, 15 epochs = 105 steps.
Changed: the KL term sits in the loss (k3, DeepSeekMath) rather than in the reward (see grpo/loss.py).
Dropped: PPO's value model, vLLM, multi-turn tool execution (ToolRL is single-step).
"""
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from data import build_prompts
from grpo import checkpoint as ckpt
from grpo import dist, lora, run
from grpo.cli import config_json
from grpo.config import Config, configure, demo_spread, fail, reward_weights
from grpo.evaluation import evaluate_heldout, evaluate_policy, heldout_config
from grpo.guard import BadSteps, stop_non_finite
from grpo.io import atomic_path, atomic_write_text
from grpo.loss import group_advantages
from grpo.model import bf16_autocast, check_model_source, load_model, load_tokenizer, set_checkpointing, use_bf16
from grpo.report import StepLog, plot_rewards, spread_line, step_metrics, trend
from grpo.rollout import decode_completions, eos_token_ids, generate_rollout, pad_token_id
from grpo.sft import sft_warm_start
from grpo.shared_prefix import logprobs_module
from grpo.tracking import open_tracker
from grpo.update import policy_update, rollout_logprobs
from rewards import RewardConfig
from rewards.custom import load_reward_fn, score_completions, weighted_total


def train(cfg: Config, examples: list, sft_examples: list | None, eval_items: list | None, resumed, changes: dict,
          progress: dict):
    """Setup (and the warm start), then the GRPO loop; `progress["step"]` counts the steps done. The examples and
    held-out items: run.load_data's; `resumed`, `changes`: run.resume_point's."""
    out, device, autocast = prepare_run(cfg, changes)
    model, policy, ref_policy, saved_model, tokenizer, paths = setup_models(cfg, out, device, autocast, resumed,
                                                                            sft_examples)
    optimizer, schedule, start_step = run.optimizer(cfg, model, resumed, changes)   # AdamW, restored on resume
    prompts, n_truncated = build_prompts(tokenizer, examples, cfg.max_prompt_length)
    B, G = cfg.prompts_per_step, cfg.num_generations
    reward_cfg = RewardConfig(length=cfg.reward_length, scale=cfg.reward_scale, granularity=cfg.reward_granularity)
    reward_fn, weights = load_reward_fn(cfg.reward_fn), reward_weights(cfg)     # weights: --reward_weights
    print(f"{len(prompts)} prompts ({n_truncated} truncated), {len(prompts) // B} steps per epoch | "
          f"{B} x {G} = {B * G} completions per step, {cfg.steps_per_generation} optimizer steps per rollout, "
          f"up to {B * G * cfg.max_new_tokens:,} completion tokens per step | device {device} x {dist.world_size()}")
    log = (StepLog(out, cfg.max_steps, start_step, open_tracker(cfg.report_to, out, asdict(cfg), start_step))
           if dist.rank() == 0 else None)                  # distributed: rank 0 alone logs
    bad = BadSteps(cfg.max_bad_steps, partial(stop_non_finite, cfg, out, saved_model, tokenizer, optimizer, schedule,
                                              str(resumed[0]) if resumed else paths["start"]))
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="GRPO steps", unit="step", disable=dist.rank() > 0)

    for step in range(start_step, cfg.max_steps):
        progress["step"] = step
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_000 + step * 1_000 + dist.rank())  # sampling: (seed, step, rank)
        epoch, batch = run.prompt_batch(cfg.seed, step, len(prompts), B)   # this rank's B / ranks of them

        # 1. sample G completions per prompt; bf16 under --bf16, and FSDP gathers its shards once per rollout
        def sample():
            with dist.full_weights(policy), autocast():
                return generate_rollout(model, [prompts[i] for i in batch], num_generations=G,
                                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        eos_ids=eos_token_ids(model, tokenizer), pad_id=pad_token_id(tokenizer),
                                        batch_size=cfg.generation_batch_size, compile=cfg.compile_generation)
        rollout, problem = bad.sample(model, sample)
        if rollout is None:                                 # NaN/inf weights or logits: the step is skipped
            bar.update()
            schedule.step()
            bad.record(problem, step + 1)
            continue
        t1 = time.perf_counter()

        # 2. score each completion with the reward
        completions = decode_completions(tokenizer, rollout)                                     # B*G strings
        truths = [examples[i].ground_truth for i in batch for _ in range(G)]
        scores = score_completions(reward_fn, completions, truths, step, reward_cfg)             # B*G dicts
        rewards = torch.tensor([weighted_total(s, weights) for s in scores])                   # (N,)
        # 3. group-relative advantages
        advantages = group_advantages(rewards, G, scale=cfg.scale_rewards).to(device)           # (N,)
        t2 = time.perf_counter()

        # 4. old (off-policy steps) and reference (KL) log-probs, once per rollout
        old_logp = rollout_logprobs(policy, rollout, cfg, autocast) if cfg.steps_per_generation > 1 else None
        ref_logp = rollout_logprobs(ref_policy, rollout, cfg, autocast) if ref_policy else None
        # 5. the update: steps_per_generation optimizer steps of the clipped surrogate + beta * KL
        stats = policy_update(policy, optimizer, rollout, advantages, old_logp, ref_logp, cfg, autocast)
        t3 = time.perf_counter()

        heldout = {}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            with dist.full_weights(policy), autocast():          # as the rollout: whole weights, bf16 on GPU
                heldout = evaluate_policy(model, tokenizer, eval_items, heldout_config(cfg, device))
        all_rewards = dist.gather(rewards)                  # distributed: every rank's, for whole-batch statistics
        metrics = step_metrics(step + 1, epoch, all_rewards, scores, rollout, stats, G, schedule.get_last_lr()[0],
                               (t0, t1, t2, t3), heldout, changes if step == start_step else None)
        schedule.step()
        bar.update()
        if log:
            log.write(metrics)
            if (step + 1) % cfg.log_samples_every == 0 or step == start_step:
                log.samples(step + 1, [examples[batch[0]].messages[-1]["content"]] * G,   # the first prompt's G
                            completions[:G], truths[:G], scores[:G])
        bad.check_update(step + 1, all_rewards, metrics)    # NaN/inf: skipped; --max_bad_steps in a row: stop
        if ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps) and not bad.weights_broken:
            ckpt.save_checkpoint(out, step + 1, saved_model, tokenizer, optimizer, schedule, config_json(cfg),
                                 cfg.keep_checkpoints)
    bar.close()
    progress["step"] = cfg.max_steps
    if dist.rank() == 0:
        finish(cfg, out, paths, saved_model, tokenizer, eval_items, device, use_bf16(cfg.bf16, device), log)


def prepare_run(cfg: Config, changes: dict):
    """Join the process group, (re)make the run directory and write its config, seed torch and set its threads.
    Returns (output dir, device, autocast: a factory of bf16-autocast contexts, plain float32 when off)."""
    dist.setup()                    # distributed: join torchrun's process group; other ranks than 0 print nothing
    out = Path(cfg.output_dir)
    if cfg.overwrite_output_dir and dist.rank() == 0:
        run.delete_run(out)
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
    # bf16 compute with float32 master weights and AdamW state (docs/PITFALLS.md #7), on the device's own
    # autocast; --bf16 auto: on for CUDA, plain float32 on a CPU.
    return out, device, bf16_autocast(device, use_bf16(cfg.bf16, device))


def setup_models(cfg: Config, out: Path, device: str, autocast, resumed, sft_examples):
    """The policy (after the warm start, with LoRA adapters if asked for), the frozen reference and what
    checkpoints save. Returns (model, policy, ref_policy or None, saved_model, tokenizer, paths), paths =
    {"untrained": the model the run began with, "start": the one GRPO starts from (the warm start's, if any)}."""
    model_path = cfg.model
    if cfg.model == "tiny":
        from grpo.tiny import DEMO_MODEL, save_tiny_model
        model_path = str(out / "tiny-init")
        if dist.rank() == 0 and not Path(model_path, "config.json").is_file():
            save_tiny_model(model_path, **DEMO_MODEL)
        dist.barrier()
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
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
    policy = logprobs_module(model, cfg.logprob_chunk_size, cfg.shared_prompt)   # each prompt once per group
    if cfg.sft_steps > 0 and not resumed:     # the reference is the policy GRPO starts from: after the warm start
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
    if cfg.beta > 0:              # LoRA: the same weights with the adapters off; otherwise a frozen copy
        ref_policy = lora.reference_policy(policy, peft_model, ref_path, device=device,
                                           bf16=use_bf16(cfg.bf16, device), trust_remote_code=cfg.trust_remote_code)
    policy = dist.wrap(policy, cfg.fsdp)    # distributed: DDP, or FSDP2 with --fsdp (shards `model` in place)
    saved_model = peft_model if cfg.lora_r else model          # LoRA: checkpoints hold the adapters (peft's format)
    return model, policy, ref_policy, saved_model, tokenizer, {"untrained": model_path, "start": ref_path}


def finish(cfg: Config, out: Path, paths: dict, saved_model, tokenizer, eval_items, device: str, bf16: bool, log):
    """The end of the run (rank 0): merged LoRA weights if asked for, the held-out table of the untrained, warm-start
    and final models, the reward plot and where everything is."""
    if cfg.merge_lora:                                  # the adapters folded in (done training: in place)
        lora.save_merged(saved_model, tokenizer, out / "merged")
        print(f"merged model (base + adapters): {out / 'merged'}")
    final = ckpt.list_checkpoints(out)[0]
    models = {f"untrained ({Path(paths['untrained']).name})": paths["untrained"]}
    if cfg.sft_steps:
        models[f"warm start ({Path(paths['start']).name})"] = paths["start"]
    models[f"GRPO ({final.name})"] = str(final)
    exact = evaluate_heldout(cfg, models, eval_items, out / "eval", device, bf16)
    if exact and (spread := demo_spread(cfg)):          # the demo's own recipe: is this run a typical one?
        print(spread_line(exact, spread))
    plot = plot_rewards(out, exact)
    print(trend(out))
    print(f"\nnewest checkpoint: {final}\nmetrics: {out / 'metrics.jsonl'}"
          + (f"\nreward curves: {plot}" if plot else "")
          + (f"\nheld-out predictions: {out / 'eval'}" if exact else ""))
    log.close()


def main(argv=None):
    """Check everything, then train; Ctrl-C ends with one line: the step reached, the newest checkpoint, and the
    command that continues (grpo/run.py)."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = configure(argv)
    if cfg.model != "tiny":                   # a path that is not there, or the hub out of reach: stop in seconds
        try:
            check_model_source(cfg.model)
        except ValueError as e:
            fail(str(e))
    data = run.load_data(cfg)                 # a bad file stops here, before any model is loaded
    resumed, changes = run.resume_point(cfg)  # before anything is written: every rank decides on the same files
    progress = {"step": resumed[1]["step"] if resumed else 0}
    try:
        train(cfg, *data, resumed, changes, progress)
    except KeyboardInterrupt:
        run.interrupted(argv, cfg, progress["step"])


if __name__ == "__main__":
    main()
