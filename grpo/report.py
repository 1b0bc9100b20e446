"""What a run writes: one fixed-format line per step, metrics.jsonl, samples.jsonl, a reward plot."""
import json
from pathlib import Path

import torch
from tqdm import tqdm

from data.jsonl import read_jsonl
from grpo import dist
from grpo.io import atomic_path, atomic_write_text
from grpo.loss import zero_std_fraction
from grpo.rollout import Rollout
from rewards.custom import reward_terms


def step_metrics(step: int, epoch: int, rewards: torch.Tensor, scores: list[dict], rollout: Rollout, stats: dict,
                 group_size: int, learning_rate: float, times: tuple[float, float, float, float], heldout: dict,
                 config_change: dict | None) -> dict:
    """One row of metrics.jsonl (each metric is defined in the README). rewards: (all ranks' N,); scores, rollout:
    this rank's; stats: the update's; times: perf_counter at the start, after sampling, scoring and the update;
    heldout: --eval_every's results ({} on other steps); config_change: what a resume with --allow_config_change
    changed (logged on its first step only). distributed: per-rank shares are
    averaged into the whole batch's."""
    t0, t1, t2, t3 = times
    metrics = {
        "step": step, "epoch": epoch,
        "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
        **reward_terms(scores),                         # rewards/<term>: each named term's mean
        "frac_reward_zero_std": zero_std_fraction(rewards, group_size),
        "completion_length": rollout.completion_mask.sum(1).float().mean().item(),
        "clipped_ratio": rollout.truncated.float().mean().item(),
        **stats, "learning_rate": learning_rate,
        "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2, "time/step": t3 - t0,
        "tokens_per_second": rollout.attention_mask.sum().item() / (t3 - t0),
    }
    metrics.update(heldout)                             # eval/... and time/eval on --eval_every steps
    if torch.cuda.is_available():
        metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if config_change:
        metrics["config_change"] = config_change
    return dist.mean_over_ranks(metrics)


class StepLog:
    """Appends to `metrics.jsonl` (one JSON object per step) and `samples.jsonl`.

    On resume from step k, rows for steps after k (written before a crash, then lost with the weights)
    are dropped, so the file always describes one consistent run.
    """

    def __init__(self, out: Path, max_steps: int, start_step: int = 0, tracker=None):
        self.metrics_path, self.samples_path, self.max_steps = out / "metrics.jsonl", out / "samples.jsonl", max_steps
        self.tracker = tracker                   # --report_to (grpo/tracking.py): gets every row written here
        for path in (self.metrics_path, self.samples_path):
            rows = read_jsonl(path) if path.is_file() else []
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))

    def write(self, m: dict) -> None:
        terms = "".join(f"{k[len('rewards/'):]} {v:5.2f} | " for k, v in m.items() if k.startswith("rewards/"))
        tqdm.write(f"step {m['step']:>5}/{self.max_steps} | reward {m['reward']:7.3f} ± {m['reward_std']:5.2f} | {terms}"
              f"kl {m['kl']:.4f} | len {m['completion_length']:6.1f} | grad {m['grad_norm']:6.3f} | "
              f"gen {m['time/generate']:5.1f}s upd {m['time/update']:5.1f}s | {m['tokens_per_second']:7.0f} tok/s")
        if "eval/reward" in m:                   # --eval_every: the held-out set, greedy
            tqdm.write(f"eval {m['step']:>5}/{self.max_steps} | reward {m['eval/reward']:7.3f} | format "
                       f"{m['eval/format_accuracy']:6.1%} | tool names {m['eval/name_accuracy']:6.1%} | exact match "
                       f"{m['eval/exact_match']:6.1%} | {m['time/eval']:5.1f}s (held-out, greedy)")
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tracker:
            self.tracker.log(m, m["step"])

    def samples(self, step: int, requests: list[str], completions: list[str], truths: list[str],
                scores: list[dict]) -> None:
        """Completions with what was asked (the user turn), the ground truth and the reward terms."""
        rows = [{"step": step, "request": request, "completion": completion, "ground_truth": truth, **score}
                for request, completion, truth, score in zip(requests, completions, truths, scores)]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if self.tracker:
            self.tracker.table("samples", rows, step)

    def close(self) -> None:
        if self.tracker:
            self.tracker.close()


def trend(out: Path) -> str:
    """"reward -2.10 -> -1.89, format 0.56 -> 0.83, correctness ... (mean of the first and last quarter of the
    40 steps)": per-step means are noisy (a batch's mix of prompts moves them), so compare windows."""
    rows = read_jsonl(out / "metrics.jsonl")
    window = len(rows) // 4
    if window == 0:
        return ""
    parts = []
    for key in ["reward"] + [k for k in rows[0] if k.startswith("rewards/") and any(r.get(k) for r in rows)]:
        first = sum(r[key] for r in rows[:window]) / window
        last = sum(r[key] for r in rows[-window:]) / window
        parts.append(f"{key.split('/')[-1]} {first:.2f} -> {last:.2f}")
    return ", ".join(parts) + f" (mean of the first and last quarter of the {len(rows)} GRPO steps)"


def spread_line(exact: dict[str, float], spread: dict[str, tuple[float, float]]) -> str:
    """This run's exact match beside the range the same recipe reached over seeds. exact: {model label: fraction}
    (labels begin with "warm start" or "GRPO"); spread: {"warm start": (lo, hi), "GRPO": (lo, hi)} in percent."""
    ours = {kind: 100 * value for label, value in exact.items() for kind in spread if label.startswith(kind)}
    typical = ", ".join(f"{kind} {lo:.1f}" + (f"-{hi:.1f}" if hi > lo else " on every seed")
                        for kind, (lo, hi) in spread.items())
    this = ", ".join(f"{kind} {ours[kind]:.1f}" + ("" if lo <= ours[kind] <= hi else " (outside that range)")
                     for kind, (lo, hi) in spread.items())
    return (f"over seeds 42, 1, 2, 3 and 4, at 1 and 2 threads, this recipe scored {typical} exact match (the digits "
            f"depend on the CPU: docs/DEMO.md); this run: {this}")


def plot_rewards(out: Path, heldout: dict[str, float] | None = None) -> Path | None:
    """reward_curves.png: total reward and its terms against the step (needs matplotlib); with --eval_every, a
    panel of the held-out accuracies during training; with `heldout` ({model label: exact match in [0, 1]}), a
    panel of bars: held-out exact match per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install matplotlib): no reward plot written")
        return None
    rows = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    evals = [r for r in rows if "eval/exact_match" in r]              # --eval_every steps
    panels = 1 + bool(evals) + bool(heldout)
    fig, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2] + [1] * (panels - 1)})
    ax = axes[0, 0]
    for key in ["reward"] + [k for k in rows[0] if k.startswith("rewards/")]:          # the reward's own terms
        if any(r.get(key) for r in rows):
            values = [r[key] for r in rows]
            line, = ax.plot(steps, values, alpha=0.35, label=f"{key} (per step)")
            smooth = [sum(values[max(0, i - 4):i + 1]) / len(values[max(0, i - 4):i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, color=line.get_color(), label=f"{key} (mean of last 5)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward of the step's completions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if evals:
        during = axes[0, 1]
        for key in ("eval/format_accuracy", "eval/name_accuracy", "eval/exact_match"):
            during.plot([r["step"] for r in evals], [100 * r[key] for r in evals], marker="o", label=key)
        during.set_ylim(0, 105)
        during.set_xlabel("GRPO step")
        during.set_ylabel("held-out set (--eval_data), greedy (%)")
        during.legend(fontsize=8)
        during.grid(alpha=0.3)
    if heldout:
        bars = axes[0, -1]
        labels, values = [label.split(" (")[0] for label in heldout], [100 * v for v in heldout.values()]
        bars.bar(labels, values, color=["0.6", "tab:blue", "tab:green", "tab:orange"][:len(labels)])
        for i, v in enumerate(values):
            bars.text(i, v + 1, f"{v:.0f}%", ha="center")
        bars.set_ylim(0, 105)
        bars.set_ylabel("exact match, held-out set (--eval_data) (%)")
        bars.set_title("greedy, prompts never trained on", fontsize=9)
        bars.tick_params(axis="x", labelsize=8)
    path = out / "reward_curves.png"
    with atomic_path(path) as tmp:                          # ".tmp-reward_curves.png": still a .png to savefig
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def heldout_exact_match(out: Path) -> dict[str, float] | None:
    """{model directory name: exact match} from the run's end-of-run evaluation (out/eval/summary.json), if any."""
    path = out / "eval" / "summary.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())["results"]
    return {Path(model).name: next(iter(r.values()))["exact_match"] for model, r in results.items()}


if __name__ == "__main__":
    # python -m grpo.report runs/grpo: redraw the plot of any run, finished or still going
    import sys
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        raise SystemExit("usage: python -m grpo.report RUN_DIR (a directory with metrics.jsonl)")
    run = Path(sys.argv[1])
    print(plot_rewards(run, heldout_exact_match(run)))
    print(trend(run))
