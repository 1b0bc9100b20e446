"""GRPO's variants side by side on a real run: each one's GRPO steps from the same warm start, scored the same way.

    python bench/variants.py runs/grpo                         # after `python train.py` wrote runs/grpo
    python bench/variants.py runs/grpo --only grpo,sequence    # some of them (names below)
    python bench/variants.py runs/grpo -- --cpu_threads 1      # any train.py flags after `--`

Takes a finished train.py run with a warm start (sft-init/) and runs its GRPO steps again from that warm start
once per variant of grpo/loss.py's table, with every other value of the run's train_config.json (so: the same
prompts, seed and number of steps), into <run>/variants/<name>/. Then prints one markdown row per variant: the
held-out exact match after the steps (train.py's end-of-run evaluation) and the mean reward over the last
quarter of the steps. One seed: a row says what a variant did on this run, not what it does in general.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from common import split_train_flags  # noqa: E402
from data.jsonl import read_jsonl  # noqa: E402

# name -> the flags that make the variant (the defaults: TRL's dapo aggregation, token-level ratio)
VARIANTS = {
    "default (dapo)": [],
    "grpo": ["--loss_type", "grpo"],
    "dr_grpo": ["--loss_type", "dr_grpo"],
    "bnpo": ["--loss_type", "bnpo"],
    "sequence": ["--importance_sampling_level", "sequence", "--epsilon", "3e-4", "--epsilon_high", "4e-4"],
    "mask_truncated": ["--mask_truncated_completions"],
    "top_entropy_0.2": ["--top_entropy_quantile", "0.2"],
    "reward_weights_1,2": ["--reward_weights", "1,2"],
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, extra = split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run", help="output directory of a finished train.py run with --sft_steps > 0")
    parser.add_argument("--only", default="", help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    args = parser.parse_args(own)
    run = Path(args.run)
    if not (run / "train_config.json").is_file() or not (run / "sft-init").is_dir():
        raise SystemExit(f"{run}: not a finished train.py run with a warm start (needs train_config.json and sft-init/)")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(VARIANTS)
    if unknown := [n for n in names if n not in VARIANTS]:
        raise SystemExit(f"--only: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rows = ["| variant | flags | held-out exact match | reward, last quarter of the steps |", "|---|---|---|---|"]
    for name in names:
        out = run / "variants" / name.split(" ")[0]
        train.main(["--config", str(run / "train_config.json"), "--model", str(run / "sft-init"), "--sft_steps", "0",
                    "--output_dir", str(out), "--overwrite_output_dir", *VARIANTS[name], *extra])
        results = json.loads((out / "eval" / "summary.json").read_text())["results"]
        final = [r for model, r in results.items() if "checkpoint-" in model][0]
        exact = next(iter(final.values()))["exact_match"]
        metrics = read_jsonl(out / "metrics.jsonl")
        last = metrics[-max(1, len(metrics) // 4):]
        rows.append(f"| {name} | `{' '.join(VARIANTS[name]) or '(none)'}` | {100 * exact:.2f} | "
                    f"{sum(m['reward'] for m in last) / len(last):.3f} |")
        print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
