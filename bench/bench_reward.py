"""How many completions per second the ToolRL reward scores, on real ground truths.

The reward runs on the CPU once per sampled completion; this shows it costs nothing next to generation.
Completions are the ground truths themselves plus simple mutations of them (a dropped parameter, a
value of the wrong type, a broken tag), so every branch of the scorer is exercised.

    python bench/bench_reward.py                      # reads ../shared/data beside the checkout
    python bench/bench_reward.py --scale dynamic --granularity finegrained --length fixed
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from rewards import RewardConfig, toolrl_reward  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

BUILT_IN = [  # used when the real data is absent
    '<think> Get the weather. </think>\n<tool_call>\n{"name": "weather", "parameters": {"city": "Paris"}}\n</tool_call>',
    '<think> Two calls. </think>\n<tool_call>\n{"name": "a", "parameters": {"x": 1}}\n'
    '{"name": "b", "parameters": {"y": "2", "z": [1]}}\n</tool_call>\n<response> Done. </response>',
    "<think> Just answer. </think>\n<response> Hello! </response>",
]


def load_ground_truths(data: Path) -> list[str]:
    sft = data / "toolrl" / "rlla_sft.json"
    if not sft.is_file():
        print(f"no real data at {data}; using {len(BUILT_IN)} built-in ground truths")
        return BUILT_IN
    return [row["output"] for row in json.loads(sft.read_text())]


def mutate(ground_truth: str, rng: random.Random) -> str:
    """The ground truth itself, or it with one plausible model mistake."""
    mistakes = [
        lambda s: s,
        lambda s: s.replace('": 1', '": "1"', 1),  # a number given as a string
        lambda s: s.replace(', "', ', "wrong_', 1),  # a misspelt parameter
        lambda s: s.replace("</tool_call>", "", 1),  # an unclosed block
        lambda s: s.replace("</think>\n", "</think>", 1),  # a layout slip
        lambda s: "Sure! " + s,  # text before <think>
    ]
    return rng.choice(mistakes)(ground_truth)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding toolrl/rlla_sft.json")
    parser.add_argument("--completions", type=int, default=20_000, help="completions to score")
    parser.add_argument("--length", default="none", help="RewardConfig.length")
    parser.add_argument("--scale", default="original", help="RewardConfig.scale")
    parser.add_argument("--granularity", default="original", help="RewardConfig.granularity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = RewardConfig(args.length, args.scale, args.granularity)
    rng = random.Random(args.seed)
    ground_truths = load_ground_truths(args.data)
    pairs = []
    for _ in range(args.completions):
        ground_truth = rng.choice(ground_truths)
        pairs.append((mutate(ground_truth, rng), ground_truth))

    start = time.perf_counter()
    for step, (completion, ground_truth) in enumerate(pairs):
        toolrl_reward(completion, ground_truth, step % 105, config)
    seconds = time.perf_counter() - start
    mean_chars = sum(len(c) for c, _ in pairs) / len(pairs)
    print(f"{config}: {len(pairs)} completions (mean {mean_chars:.0f} chars) in {seconds:.2f} s = "
          f"{len(pairs) / seconds:,.0f} completions/s")


if __name__ == "__main__":
    main()
