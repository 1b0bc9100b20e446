"""What a run writes: one fixed-format line per step, metrics.jsonl, samples.jsonl, a reward plot."""
import json
from pathlib import Path

from data.jsonl import read_jsonl
from grpo.io import atomic_path, atomic_write_text


class StepLog:
    """Appends to `metrics.jsonl` (one JSON object per step) and `samples.jsonl`.

    On resume from step k, rows for steps after k (written before a crash, then lost with the weights)
    are dropped, so the file always describes one consistent run.
    """

    def __init__(self, out: Path, max_steps: int, start_step: int = 0):
        self.metrics_path, self.samples_path, self.max_steps = out / "metrics.jsonl", out / "samples.jsonl", max_steps
        for path in (self.metrics_path, self.samples_path):
            rows = read_jsonl(path) if path.is_file() else []
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))

    def write(self, m: dict) -> None:
        print(f"step {m['step']:>5}/{self.max_steps} | reward {m['reward']:7.3f} ± {m['reward_std']:5.2f} | "
              f"format {m['rewards/format']:5.2f} | correct {m['rewards/correctness']:6.2f} | "
              f"kl {m['kl']:.4f} | len {m['completion_length']:6.1f} | grad {m['grad_norm']:6.3f} | "
              f"gen {m['time/generate']:5.1f}s upd {m['time/update']:5.1f}s | {m['tokens_per_second']:7.0f} tok/s",
              flush=True)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")

    def samples(self, step: int, completions: list[str], truths: list[str], scores: list[dict]) -> None:
        with open(self.samples_path, "a") as f:
            for completion, truth, score in zip(completions, truths, scores):
                f.write(json.dumps({"step": step, "completion": completion, "ground_truth": truth, **score}) + "\n")


def trend(out: Path, window: int = 5) -> str:
    """"reward -2.10 -> -1.89, format 0.56 -> 0.83 (mean of the first and last 5 steps)": per-step means
    are noisy (a batch's mix of prompts moves them), so compare windows."""
    rows = read_jsonl(out / "metrics.jsonl")
    if len(rows) < 2 * window:
        return ""
    parts = []
    for key in ("reward", "rewards/format", "rewards/correctness"):
        first = sum(r[key] for r in rows[:window]) / window
        last = sum(r[key] for r in rows[-window:]) / window
        parts.append(f"{key.split('/')[-1]} {first:.2f} -> {last:.2f}")
    return ", ".join(parts) + f" (mean of the first and last {window} steps)"


def plot_rewards(out: Path) -> Path | None:
    """reward_curves.png: total reward and its components against the step (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no reward plot written")
        return None
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("reward", "rewards/format", "rewards/correctness", "rewards/length"):
        if any(r.get(key) for r in rows):
            values = [r[key] for r in rows]
            line, = ax.plot(steps, values, alpha=0.35, label=f"{key} (per step)")
            smooth = [sum(values[max(0, i - 4):i + 1]) / len(values[max(0, i - 4):i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, color=line.get_color(), label=f"{key} (mean of last 5)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend()
    ax.grid(alpha=0.3)
    path = out / "reward_curves.png"
    with atomic_path(path) as tmp:                          # ".tmp-reward_curves.png": still a .png to savefig
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
