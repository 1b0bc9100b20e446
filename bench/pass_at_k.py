"""Can GRPO improve a model's greedy answers? Greedy exact match beside pass@k of sampled answers.

    python bench/pass_at_k.py runs/grpo/sft-init                      # demo validation split, k 8, T 1.0 and 0.7
    python bench/pass_at_k.py runs/grpo/sft-init --temperatures 1.0 0.5 --k 16
    python bench/pass_at_k.py runs/smol/sft-init --data ../shared/data/toolrl/rlla_sft.json --max_new_tokens 160 \
        --max_prompt_tokens 2048 --k 4 --temperatures 1.0 --limit 16       # the real model's warm start

GRPO raises the probability of the completions that score above their group's mean. A prompt whose k
samples are all wrong gives it nothing to reinforce, so greedy exact match can rise towards pass@k at the
rollout's temperature and rarely beyond it: where pass@k is close to greedy, expect GRPO to add little.
"Mixed" prompts (some samples right, some wrong) are where its signal comes from. Exact match is eval.py's
(correctness at its maximum), over the split's rows whose target calls tools.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import build_prompts, load_examples  # noqa: E402
from grpo.evaluation import score_toolrl  # noqa: E402
from grpo.model import load_model, load_tokenizer  # noqa: E402
from grpo.rollout import generate_text  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("model", help="a model directory (e.g. runs/grpo/sft-init)")
    parser.add_argument("--data", default="demo", help="demo, or a ToolRL raw JSON file (its --split part)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"], help="split of --data")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts that call tools (0: all)")
    parser.add_argument("--max_prompt_tokens", type=int, default=512)
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (0: its default)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"{args.model}: not a model directory (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = [e for e in load_examples(args.data, split=args.split) if "<tool_call>" in e.ground_truth]
    examples = examples[:args.limit or None]
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    prompts, _ = build_prompts(tokenizer, examples, max_prompt_tokens=args.max_prompt_tokens)

    def right(k: int, temperature: float) -> list[int]:
        """How many of k answers per prompt are exactly right."""
        outputs = generate_text(model, tokenizer, [p for p in prompts for _ in range(k)], temperature=temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=256)
        exact = [score_toolrl(examples[i // k], out)["correct"] for i, out in enumerate(outputs)]
        return [sum(exact[i * k:(i + 1) * k]) for i in range(len(examples))]

    torch.manual_seed(args.seed)
    n = len(examples)
    print(f"{args.model}, {args.data} {args.split} split, {n} prompts that call tools")
    print(f"greedy exact match: {100 * sum(right(1, 0.0)) / n:.1f}%")
    for temperature in args.temperatures:
        counts = right(args.k, temperature)
        print(f"T={temperature}: one sample {100 * sum(counts) / (n * args.k):.1f}%, "
              f"pass@{args.k} {100 * sum(c > 0 for c in counts) / n:.1f}%, "
              f"mixed {100 * sum(0 < c < args.k for c in counts) / n:.1f}% of prompts")


if __name__ == "__main__":
    main()
