"""The supervised warm start: steps of -mean log p(ground truth + EOS | prompt) on the targets of --sft_data,
before GRPO (and the paper's SFT baselines). A model that never writes the format gets reward -3 on every sample,
so every group has zero variance and GRPO alone has nothing to learn from: the warm start gives it a format to
improve on. bench/sft_control.py runs it for a given wall time instead, as GRPO's supervised control."""
import time
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from data import build_prompts
from grpo.guard import BadSteps
from grpo.logprobs import CompletionLogprobs
from grpo.loss import masked_sum
from grpo.rollout import left_pad, pad_token_id
from grpo.update import lr_factor


def sft_warm_start(cfg, examples: list, policy: CompletionLogprobs, tokenizer, autocast, start: int = 0,
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
