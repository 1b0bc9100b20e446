"""The control for the demo: is it GRPO that helps, or just more training?

    python bench/sft_control.py runs/grpo                  # after `python train.py` wrote runs/grpo
    python bench/sft_control.py runs/grpo --sft_data demo  # the same, on the gold calls instead of the teacher's
    python bench/sft_control.py runs/smol --eval_data none # the control only (docs/REAL_MODEL.md scores it with eval.py)

Takes a finished train.py run with a supervised warm start, continues that warm start (sft-init/) with more
supervised steps, on the same data (or on --sft_data) with the same batch size and learning rate, for as much
wall time as the run's GRPO steps took (the sum of their `time/step` in metrics.jsonl), on a CPU with the run's
number of threads (a tool for the CPU demo: a GPU run's control would need its device and precision too).
Then it scores the untrained model, the warm start, the GRPO model and this supervised control on the same
held-out split with eval.py's code, and prints one row per model with its training time: the paper's
Table 1 (raw -> SFT -> GRPO) in miniature, with the control beside it. Writes <run>/sft-control/ (the
model) and <run>/sft-control-eval/ (predictions and summary); with --sft_data X, sft-control-X/ and
sft-control-X-eval/.

The control starts a fresh AdamW (sft-init holds weights only) and continues the warm start's data order
where it stopped.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.jsonl import read_jsonl  # noqa: E402
from grpo import checkpoint as ckpt  # noqa: E402
from grpo.config import saved_config  # noqa: E402
from grpo.evaluation import evaluate_heldout  # noqa: E402
from grpo.io import atomic_path  # noqa: E402
from grpo.logprobs import CompletionLogprobs  # noqa: E402
from grpo.model import bf16_autocast, load_model, load_tokenizer, use_bf16  # noqa: E402
from grpo.run import load_data  # noqa: E402
from grpo.sft import sft_warm_start  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("run", help="output directory of a finished train.py run with --sft_steps > 0")
    parser.add_argument("--sft_data", help="the control's data (default: the run's --sft_data), e.g. demo: the "
                                           "gold calls where the run warm-started on demo-sft")
    parser.add_argument("--eval_data", help="where the four models are compared (default: the run's --eval_data); "
                                            "none: train and save the control only, to score it with eval.py")
    args = parser.parse_args(argv)
    run = Path(args.run)
    config_path, metrics_path = run / "train_config.json", run / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file() or not (run / "sft-init").is_dir():
        raise SystemExit(f"{run}: not a finished train.py run with a warm start (needs train_config.json, "
                         "metrics.jsonl and sft-init/)")
    saved = json.loads(config_path.read_text())
    cfg = saved_config(saved)
    name, warm_data = "sft-control", cfg.sft_data
    if args.sft_data and args.sft_data != cfg.sft_data:
        name, cfg = f"sft-control-{Path(args.sft_data).stem}", replace(cfg, sft_data=args.sft_data)
    if args.eval_data:
        cfg = replace(cfg, eval_data=args.eval_data)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    rows = read_jsonl(metrics_path)
    grpo_seconds = sum(r["time/step"] for r in rows)

    # ---- continue the warm start for the GRPO steps' wall time
    model = load_model(str(run / "sft-init"))
    model.train()
    tokenizer = load_tokenizer(str(run / "sft-init"))
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    _, sft_examples, eval_items = load_data(cfg)
    bf16 = use_bf16(cfg.bf16, "cpu")                    # the run's precision (--bf16 true on a CPU, or float32)
    steps = sft_warm_start(cfg, sft_examples, CompletionLogprobs(model, cfg.logprob_chunk_size), tokenizer,
                           bf16_autocast("cpu", bf16), start=cfg.sft_steps, seconds=grpo_seconds)
    control_seconds = time.perf_counter() - t0
    with atomic_path(run / name) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"{len(rows)} GRPO steps took {grpo_seconds:.1f} s; {steps} more supervised steps took {control_seconds:.1f} s")

    # ---- the four models on the held-out split, scored as train.py's end-of-run table
    initial = run / "tiny-init" if cfg.model == "tiny" else Path(cfg.model)
    models = {f"untrained ({initial.name})": str(initial),
              f"warm start: {cfg.sft_steps} SFT steps on {warm_data}": str(run / "sft-init"),
              f"+ {len(rows)} GRPO steps, {grpo_seconds:.0f} s": str(ckpt.list_checkpoints(run)[0]),
              f"+ {steps} SFT steps on {cfg.sft_data}, {control_seconds:.0f} s": str(run / name)}
    evaluate_heldout(cfg, models, eval_items, run / f"{name}-eval", "cpu", bf16)


if __name__ == "__main__":
    main()
