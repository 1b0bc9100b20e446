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
from grpo.packing import PackedLogprobs, pack
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
    packed = PackedLogprobs(policy.model, policy.chunk_size) if cfg.sft_packing else None
    t0, step, bad = time.perf_counter(), start, BadSteps(cfg.max_bad_steps)
    bar = tqdm(total=cfg.sft_steps if seconds is None else None, desc="warm start (supervised)")
    while (step < start + cfg.sft_steps) if seconds is None else (time.perf_counter() - t0 < seconds):
        idx = [order[(step * cfg.sft_batch_size + i) % len(examples)].item() for i in range(cfg.sft_batch_size)]
        loss = supervised_loss([prompts[i] for i in idx], [targets[i] for i in idx], policy, packed, tokenizer,
                               autocast)              # its backward is done
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


def supervised_loss(prompts: list[list[int]], targets: list[list[int]], policy: CompletionLogprobs,
                    packed: PackedLogprobs | None, tokenizer, autocast) -> torch.Tensor:
    """-mean log p(target | prompt) over the batch's target tokens, its gradient accumulated (backward done).
    packed: whole sequences end to end in rows (grpo/packing.py), each row one forward, no padding computed;
    None: one batch of [left-padded prompts | right-padded targets]. The same loss and gradient either way."""
    device = next(policy.parameters()).device
    n_targets = sum(len(t) for t in targets)
    if packed is not None:
        loss = 0.0
        for row in pack(prompts, targets):
            with autocast():
                logp, _ = packed(row.input_ids.to(device), row.position_ids.to(device), row.target_mask.to(device))
            row_loss = -logp.sum() / n_targets                                                  # (1, S) -> scalar
            row_loss.backward()
            loss += row_loss.detach()
        return loss
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id(tokenizer))                         # (b, P)
    T = max(len(t) for t in targets)
    target_ids = torch.tensor([t + [pad_token_id(tokenizer)] * (T - len(t)) for t in targets])
    target_mask = torch.tensor([[j < len(t) for j in range(T)] for t in targets])                # (b, T)
    ids = torch.cat([prompt_ids, target_ids], 1).to(device)
    attn = torch.cat([prompt_mask, target_mask.long()], 1).to(device)
    with autocast():
        logp, _ = policy(ids, attn, target_mask.to(device))                                      # (b, T)
    loss = -masked_sum(logp, target_mask.to(device)) / n_targets
    loss.backward()
    return loss
