"""Forward + backward time of the shared-prompt path (grpo/shared_prefix.py) and of packing (grpo/packing.py)
against the padded path they replace, on a CPU, with a random SmolLM2-135M-shaped Llama model.

    python bench/shared_prefix_check.py                       # 30 layers, 1 thread, both checks (~15 minutes)
    python bench/shared_prefix_check.py --layers 6 --threads 2

update:     ToolRL-shaped GRPO micro-batch: 2 prompts (~800 tokens, different lengths) x G = 4 completions
            (~150 tokens, different lengths); CompletionLogprobs vs SharedPromptLogprobs.
warm start: 8 (prompt, target) lengths drawn from SFT400 under Qwen2.5's tokenizer; the padded batch vs packed
            rows of at most the longest sequence (one forward each) vs every sequence in one row.
Each variant runs --repeats times, alternating; the figure is the fastest run's CPU time (other processes on the
machine inflate wall time, not CPU time).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.cli import field, parse_config  # noqa: E402
from grpo.logprobs import CompletionLogprobs  # noqa: E402
from grpo.model import set_checkpointing  # noqa: E402
from grpo.packing import PackedLogprobs, pack  # noqa: E402
from grpo.rollout import left_pad  # noqa: E402
from grpo.shared_prefix import SharedPromptLogprobs  # noqa: E402

PROMPTS = [812, 767]                                     # ToolRL prompts: median 688, long tail to 2,155
COMPLETIONS = [150, 131, 162, 97, 149, 140, 118, 155]    # G = 4 per prompt, prompt-major
SFT_PROMPTS = [793, 912, 1115, 520, 505, 660, 719, 1083]
SFT_TARGETS = [296, 440, 244, 294, 414, 387, 429, 410]


@dataclass
class Check:
    """Shared-prompt and packed log-probs against the padded path."""
    layers: int = field(30, "decoder layers (SmolLM2-135M has 30)")
    threads: int = field(1, "torch CPU threads")
    repeats: int = field(2, "runs of each variant, alternating; the fastest counts")
    checkpointing: bool = field(False, "gradient checkpointing on (the update check)")
    only: str = field("both", "which check", choices=["update", "warm_start", "both"])


def smollm_like(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=layers,
                                        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                        tie_word_embeddings=True)).train()


def fastest(model, steps: dict, repeats: int) -> dict[str, float]:
    """{name: the least CPU seconds of `repeats` runs of steps[name]()}, the variants alternating."""
    times = {}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.process_time()
            step()
            times[name] = min(times.get(name, float("inf")), time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    return times


def update_batch(vocab: int):
    """(ids, attention_mask, completion_mask): Rollout's layout, rows of a prompt adjacent."""
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in PROMPTS]
    G = len(COMPLETIONS) // len(PROMPTS)
    prompt_ids, prompt_mask = left_pad(prompts, 0)                           # (K, P)
    T = max(COMPLETIONS)
    completion_mask = torch.arange(T)[None] < torch.tensor(COMPLETIONS)[:, None]     # (N, T)
    completion_ids = torch.randint(3, vocab, completion_mask.shape) * completion_mask
    ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion_ids], 1)          # (N, P + T)
    attn = torch.cat([prompt_mask.repeat_interleave(G, 0), completion_mask.long()], 1)
    return ids, attn, completion_mask


def check_update(model, cfg: Check) -> None:
    set_checkpointing(model, cfg.checkpointing)
    ids, attn, comp = update_batch(model.config.vocab_size)
    N, T = comp.shape
    P = ids.shape[1] - T
    paths = {"padded": CompletionLogprobs(model), "shared": SharedPromptLogprobs(model)}

    def step(policy):
        logp, entropy = policy(ids, attn, comp)
        (logp.sum() + 0.01 * entropy.sum()).backward()

    times = fastest(model, {name: lambda p=p: step(p) for name, p in paths.items()}, cfg.repeats)
    positions = {name: p.computed_positions for name, p in paths.items()}     # what each decoder pass ran
    print(f"update ({N} rows, P={P}, T={T}, checkpointing {cfg.checkpointing}): real tokens "
          f"{int(attn.sum())}")
    for name in paths:
        print(f"  {name:8s} {positions[name]:6d} positions  {times[name]:7.2f} s")
    print(f"  shared/padded time {times['shared'] / times['padded']:.2f}")


def check_warm_start(model, cfg: Check) -> None:
    set_checkpointing(model, False)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in SFT_PROMPTS]
    targets = [torch.randint(3, vocab, (n,)).tolist() for n in SFT_TARGETS]
    real = sum(SFT_PROMPTS) + sum(SFT_TARGETS)
    prompt_ids, prompt_mask = left_pad(prompts, 0)
    T = max(SFT_TARGETS)
    target_mask = torch.arange(T)[None] < torch.tensor(SFT_TARGETS)[:, None]
    target_ids = torch.randint(3, vocab, target_mask.shape)
    padded = (torch.cat([prompt_ids, target_ids], 1), torch.cat([prompt_mask, target_mask.long()], 1), target_mask)

    def step_padded():
        logp, _ = CompletionLogprobs(model)(*padded)
        (-logp.sum() / target_mask.sum()).backward()

    def step_packed(row_tokens):
        for row in pack(prompts, targets, row_tokens):
            logp, _ = PackedLogprobs(model)(row.input_ids, row.position_ids, row.target_mask)
            (-logp.sum() / target_mask.sum()).backward()

    variants = {"padded": (step_padded, padded[0].numel()),
                "rows": (lambda: step_packed(None), real),
                "one row": (lambda: step_packed(real), real)}
    print(f"warm start ({len(prompts)} sequences, {real} real tokens; rows of <= "
          f"{max(p + t for p, t in zip(SFT_PROMPTS, SFT_TARGETS))} tokens: "
          f"{len(pack(prompts, targets))})")
    times = fastest(model, {name: step for name, (step, _) in variants.items()}, cfg.repeats)
    for name, (_, positions) in variants.items():
        print(f"  {name:8s} {positions:6d} positions ({positions / real:.2f}x real)  {times[name]:7.2f} s "
              f"({times[name] / times['padded']:.2f}x padded)")


if __name__ == "__main__":
    cfg, _ = parse_config(Check, sys.argv[1:])
    torch.set_num_threads(cfg.threads)
    model = smollm_like(cfg.layers)
    if cfg.only in ("update", "both"):
        check_update(model, cfg)
    if cfg.only in ("warm_start", "both"):
        check_warm_start(model, cfg)
