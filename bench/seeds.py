"""The demo over seeds and thread counts: what a newcomer's `python train.py` will print, as a range.

    python bench/seeds.py                                  # seeds 1-5 at 2 threads, then at 1 thread (~1.5 hours)
    python bench/seeds.py --seeds 1,2,3 --threads 2 -- --sft_steps 400    # any train.py flags after `--`

Each run is a fresh `python train.py --seed S --cpu_threads N` process (its wall time is the newcomer's), into
<out>/t<N>-s<S>/. The warm start and the final model are scored on the demo's test split (train.py's own
end-of-run table) and on its validation split (eval.py's code): choices of the recipe are made on validation,
never on test. Prints one row per run and, per thread count, the median, min and max of each column; writes
<out>/seeds.json.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import split_train_flags  # noqa: E402
from grpo.checkpoint import list_checkpoints  # noqa: E402
from grpo.config import saved_config  # noqa: E402
from grpo.evaluation import evaluate, heldout_config  # noqa: E402
from grpo.model import use_bf16  # noqa: E402

COLUMNS = ("warm_test", "final_test", "gain_test", "warm_val", "final_val", "minutes")


def one_run(out: Path, seed: int, threads: int, extra: list[str]) -> dict:
    run = out / f"t{threads}-s{seed}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--cpu_threads", str(threads),
                    "--output_dir", str(run), "--overwrite_output_dir", *extra], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    minutes = (time.perf_counter() - t0) / 60
    test = json.loads((run / "eval" / "summary.json").read_text())["results"]
    warm, final = str(run / "sft-init"), str(list_checkpoints(run)[0])
    cfg = saved_config(json.loads((run / "train_config.json").read_text()))   # the run's own lengths, precision
    config = heldout_config(replace(cfg, eval_data="validation"), "cpu", [warm, final], run / "eval-validation",
                            use_bf16(cfg.bf16, "cpu"))
    val = evaluate(config)
    row = {"seed": seed, "threads": threads, "warm_test": 100 * test[warm]["demo"]["exact_match"],
           "final_test": 100 * test[final]["demo"]["exact_match"], "warm_val": 100 * val[warm]["demo"]["exact_match"],
           "final_val": 100 * val[final]["demo"]["exact_match"], "minutes": minutes}
    row["gain_test"] = row["final_test"] - row["warm_test"]
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    own, extra = split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--threads", default="2,1", help="comma-separated --cpu_threads values")
    parser.add_argument("--out", default="runs/seeds")
    args = parser.parse_args(own)
    out = Path(args.out)
    rows = []
    for threads in map(int, args.threads.split(",")):
        for seed in map(int, args.seeds.split(",")):
            rows.append(one_run(out, seed, threads, extra))
            r = rows[-1]
            print(f"threads {threads} seed {seed}: " + ", ".join(f"{c} {r[c]:.2f}" for c in COLUMNS), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps({"train_flags": extra, "runs": rows}, indent=2))
    print("\n| threads | runs | " + " | ".join(f"{c} median (min-max)" for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for threads in sorted({r["threads"] for r in rows}, reverse=True):
        group = [r for r in rows if r["threads"] == threads]
        cells = [f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
                 for v in ([r[c] for r in group] for c in COLUMNS)]
        print(f"| {threads} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
