"""Evaluate models side by side on the ToolRL paper's benchmarks (Qian et al. 2025, Tables 1-3).

    python eval.py --model Qwen2.5-1.5B-Instruct --model runs/grpo/checkpoint-000105 \\
        --benchmarks toolrl,apibank,bfcl --output_dir eval_out [--limit 20]

Each model (a hub id, a bare "Qwen2.5-..." name, a local directory or a train.py checkpoint) answers
every item greedily; the answers are scored, and a table of models x metrics is printed and written.

  toolrl   the ToolRL held-out split (80 rows): mean reward and its terms (rewards/toolrl.py, the
           paper's default reward), format accuracy (format term at its maximum), and over the rows
           whose target makes calls, tool-name accuracy (the set of called names equals the gold set)
           and exact match (correctness at its maximum: the gold calls, in any order).
  demo     the built-in demo set's held-out split (data/demo.py; --demo_split, test by default), scored
           as toolrl. train.py ends with this table for the untrained, warm-start and final models.
  apibank  API-Bank levels 1-3 (399 / 67 / 131 rows) with the paper's protocol (rewards/apibank.py):
           accuracy per level and overall = correct / 597.
  bfcl     BFCL's single-turn categories (data/bfcl.py, prompted as the paper's BFCL handler did),
           scored by BFCL's AST rules (rewards/bfcl.py): accuracy per category and the
           leaderboard's summary columns. BFCL's overall score also needs its multi-turn and
           agentic sets, which are not run here.
  Bamboogle is left out: it needs live web search and a GPT-4o judge.

Output, under output_dir:
  summary.json, summary.md                   every metric of every model and benchmark
  <model>/<benchmark>/predictions.jsonl      one row per item: id, category (BFCL) or level (API-Bank),
                                             raw output, parsed calls, correct, and the benchmark's details
`--rescore` re-scores those files in place without loading any model (e.g. after a scorer fix); no file is
replaced until all are scored. Every file is written whole or not at all (grpo/io.py).
"""
from functools import partial

from data import DownloadError
from grpo import cli
from grpo.cli import config_json, parse_config
from grpo import evaluation
from grpo.evaluation import EvalConfig, benchmark_names, evaluate, plain, tables
from grpo.model import check_model_source

fail = partial(cli.fail, "eval.py")   # one line on stderr, exit code 2


def main(config: EvalConfig) -> dict:
    """Check the command line and read every benchmark's data before any model loads: a mistake stops with one
    line (exit code 2), not after the first model's hour. The benchmarks themselves: grpo/evaluation.py."""
    names = benchmark_names(config)
    unknown = [b for b in names if b not in evaluation.BENCHMARKS]
    if unknown:
        fail(f"--benchmarks: unknown {unknown}; choose from {list(evaluation.BENCHMARKS)}")
    if not config.model:
        fail("--model: give at least one (repeat the flag for several)")
    if config.limit < 0 or config.max_new_tokens <= 0 or config.batch_size <= 0:
        fail("--limit must be >= 0, --max_new_tokens and --batch_size > 0")
    for name in config.model:
        try:
            if not config.rescore:
                check_model_source(name)
        except ValueError as e:
            fail(str(e))
    try:
        benchmarks = {name: evaluation.BENCHMARKS[name].load(config) for name in names}
    except (DownloadError, ValueError, FileNotFoundError, ImportError) as e:  # DownloadError: one line already
        fail(str(e))
    print(config_json(config))
    summary = evaluate(config, benchmarks)
    print("\n\n".join(plain(t) for t in tables(summary, names)))
    return summary


if __name__ == "__main__":
    main(parse_config(EvalConfig, prog="eval.py")[0])
