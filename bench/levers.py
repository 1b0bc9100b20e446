"""Each performance lever of docs/PERFORMANCE.md as an A/B of bench_grpo.py runs: with and without, alternating.

    python bench/levers.py                          # CPU: qwen2-small, 1 thread, CPU time (~40 minutes)
    python bench/levers.py --gpu                    # one GPU: Qwen2.5-1.5B, the reference workload
    python bench/levers.py --gpu --only compile     # one lever (names below)

Every run is a fresh process of bench_grpo.py on the same workload and seed; a lever's figure is the median,
over --repeats, of the phase it acts on (generation or update) and of that phase's peak memory. It prints a
markdown table (the one in docs/PERFORMANCE.md).
"""
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.cli import field, parse_config  # noqa: E402

BENCH = str(Path(__file__).resolve().parent / "bench_grpo.py")
WORKLOADS = {
    "cpu": ["--config", "qwen2-small", "--prompts", "4", "--num_generations", "4", "--prompt_tokens", "128",
            "--completion_tokens", "64", "--threads", "1", "--clock", "cpu"],
    "gpu": ["--config", "qwen2.5-1.5b", "--prompts", "64", "--num_generations", "8", "--prompt_tokens", "1024",
            "--completion_tokens", "512"],
}
GENERATION = ["--only_generation"]
VARIED = ["--ignore_eos", "false", "--eos_rate", "0.02"]   # random weights: lengths ~ geometric, mean 50 tokens
# name: (what it is, phase, args of both runs, args with the lever, args without it, GPU only)
LEVERS = {
    "prefix_and_exit": ("shared-prefix prefill + finished rows leave (lengths vary)", "generation",
                        GENERATION + VARIED, [], ["--generation", "plain"], False),
    "prefix": ("shared-prefix prefill (every completion full length)", "generation",
               GENERATION, [], ["--generation", "plain"], False),
    "kv_reserve": ("KV appended into reserved room (vs torch.cat per token)", "generation",
                   GENERATION, [], ["--kv_append", "cat"], False),
    "compile": ("static KV cache + torch.compile (vs ours eager)", "generation",
                GENERATION, ["--compile_generation"], [], False),
    "completion_only": ("completion-only chunked log-probs (vs full-vocabulary logits)", "update",
                        [], [], ["--logprobs", "full"], False),
    "chunk_backward": ("hand-written chunk backward (vs checkpointed autograd)", "update",
                       [], [], ["--logprobs", "checkpointed"], False),
    "skip_zero": ("skip zero-advantage rows (half the groups flat)", "update",
                  ["--signal_fraction", "0.5"], [], ["--skip_zero_advantage", "false"], False),
    "sort": ("length-sorted micro-batches (ragged prompts and completions)", "update",
             VARIED + ["--prompt_spread", "0.8", "--micro_batch_size", "4"], ["--sort_by_length"], [], False),
    "bf16_generation": ("generation under bf16 autocast (vs the float32 master weights)", "generation",
                        GENERATION, [], ["--generation_autocast", "false"], True),
    "empty_cache": ("free the generation's cached blocks before the update", "update",
                    [], ["--empty_cache"], [], True),
}


@dataclass
class Levers:
    """A/B runs of bench_grpo.py, one lever at a time."""
    gpu: bool = field(False, "the GPU workload (Qwen2.5-1.5B, 64 x 8, 1,024 + 512 tokens) instead of the CPU one")
    repeats: int = field(2, "runs with and without each lever (alternating); the median is reported")
    only: str = field("", f"comma-separated levers to run (default: all): {', '.join(LEVERS)}")


def run(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "result.json")
        subprocess.run([sys.executable, BENCH, *args, "--steps", "2", "--warmup", "1", "--json", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def main(argv: list[str]) -> None:
    cfg, _ = parse_config(Levers, argv)
    names = cfg.only.split(",") if cfg.only else list(LEVERS)
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        raise SystemExit(f"--only: unknown lever(s) {unknown}; choose from {list(LEVERS)}")
    base = WORKLOADS["gpu" if cfg.gpu else "cpu"]
    print(f"workload: {' '.join(base)} (median of {cfg.repeats} runs each, alternating)\n")
    print("| lever | phase | with (s) | without (s) | speed-up | peak GB with | peak GB without |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        label, phase, both, with_args, without_args, gpu_only = LEVERS[name]
        if gpu_only and not cfg.gpu:
            continue
        results = {"with": [], "without": []}
        for _ in range(cfg.repeats):
            results["with"].append(run(base + both + with_args))
            results["without"].append(run(base + both + without_args))
        time = {k: statistics.median(r["phases"][phase] for r in v) for k, v in results.items()}
        peak = {k: statistics.median(r["phase_peak_gb"][phase] for r in v) for k, v in results.items()}
        print(f"| {label} (`{name}`) | {phase} | {time['with']:.2f} | {time['without']:.2f} | "
              f"{time['without'] / time['with']:.2f}x | {peak['with']:.2f} | {peak['without']:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
