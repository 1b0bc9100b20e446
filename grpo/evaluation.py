"""Evaluation as a library: the ToolRL paper's benchmarks (Qian et al. 2025, Tables 1-3), loaded, answered
greedily, scored and tabulated. eval.py is its command line; train.py's held-out comparison and --eval_every
use the same code (the last section), so a number printed during training is the number eval.py gives.

  toolrl   the ToolRL held-out split (80 rows): mean reward and its terms (rewards/toolrl.py, the
           paper's default reward), format accuracy (format term at its maximum), and over the rows
           whose target makes calls, tool-name accuracy (the set of called names equals the gold set)
           and exact match (correctness at its maximum: the gold calls, in any order).
  demo     the built-in demo set's held-out split (data/demo.py), scored as toolrl.
  apibank  API-Bank levels 1-3 (399 / 67 / 131 rows) with the paper's protocol (rewards/apibank.py):
           accuracy per level and overall = correct / 597.
  bfcl     BFCL's single-turn categories (data/bfcl.py, prompted as the paper's BFCL handler did),
           scored by BFCL's AST rules (rewards/bfcl.py).

Every file is written whole or not at all (grpo/io.py).
"""
import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

from data import build_prompts, load_examples
from data.bfcl import CATEGORIES as BFCL_CATEGORIES
from data.bfcl import load_category
from data.formats import ground_truth_calls
from data.jsonl import read_jsonl
from grpo.cli import field
from grpo.io import atomic_path, atomic_write_text
from grpo.model import load_model_and_tokenizer, use_bf16
from grpo.rollout import generate_text
from rewards import RewardConfig, toolrl_reward
from rewards import apibank, bfcl
from rewards.toolrl import SCALES


@dataclass
class EvalConfig:
    """Evaluate models side by side on the ToolRL paper's benchmarks (toolrl, apibank, bfcl)."""

    model: list[str] = field([], "model to evaluate: hub id, bare Qwen2.5/Llama name, local dir or "
                                 "train.py checkpoint; repeat the flag for several", multiple=True)
    benchmarks: str = field("toolrl,apibank,bfcl", "comma-separated benchmarks: toolrl, apibank, bfcl, demo")
    demo_split: str = field("test", "split of the demo benchmark (validation: for choosing hyperparameters)",
                            choices=["train", "validation", "test"])
    output_dir: str = field("eval_out", "where summary.json, summary.md and the predictions go")
    limit: int = field(0, "first N items of the toolrl set, of each API-Bank level, of each BFCL category; 0 = all")
    toolrl_data: str = field("", "ToolRL held-out file (.parquet/.json/.jsonl); empty: the test split (80 rows) "
                                 "of the 'toolrl' download (data/loaders.py)")
    apibank_dir: str = field("", "folder with level-{1,2,3}-api_processed.json (ToolRL's processed "
                                 "API-Bank); empty: the 'apibank' download (data/loaders.py)")
    bfcl_dir: str = field("", "folder with BFCL_v*_<category>.json and possible_answer/; empty: the data "
                              "inside the bfcl-eval package (pip install --no-deps bfcl-eval)")
    bfcl_categories: str = field(",".join(BFCL_CATEGORIES), "comma-separated BFCL categories")
    max_new_tokens: int = field(1024, "generation cap per answer (the paper's vLLM runs allowed up to 4096)")
    max_prompt_tokens: int = field(8192, "longer prompts are cut from the left (counted and reported)")
    batch_size: int = field(16, "prompts per generate call; prompts are sorted by length to limit padding")
    device: str = field("auto", "cuda, cpu or auto (cuda when available)")
    bf16: str = field("auto", "load the weights in bf16 (inference only: no master weights to keep); auto = on for "
                              "CUDA, float32 on a CPU", choices=["auto", "true", "false"])
    trust_remote_code: bool = field(False, "let transformers run code shipped with the model")
    rescore: bool = field(False, "re-score existing predictions.jsonl files instead of generating")
    skip_bad_rows: bool = field(False, "drop data rows that fail their checks (each listed) instead of stopping")


# ---------------------------------------------------------------- benchmarks: load, score, summarize
# Every item has .id and .messages ([system, user]); score(item, output) -> one predictions.jsonl row.

def load_toolrl(config: EvalConfig) -> list:
    examples = (load_examples(config.toolrl_data, skip_bad_rows=config.skip_bad_rows) if config.toolrl_data
                else load_examples("toolrl", split="test"))
    return examples[:config.limit or None]


def score_toolrl(example, output: str) -> dict:
    reward = toolrl_reward(output, example.ground_truth)  # the paper's reward, step 0
    (_, format_max), (_, correctness_max) = SCALES[RewardConfig().scale](0)
    calls, gold = readable_calls(output), ground_truth_calls(example.ground_truth)
    # tool names and exact match are defined for targets that make calls (71 of the 80); None for the others
    names_ok = calls is not None and {c["name"] for c in calls} == {c["name"] for c in gold} if gold else None
    exact = reward["correctness"] == correctness_max if gold else None
    return {"id": example.id, "output": output, "calls": calls, "correct": exact, "names_ok": names_ok,
            "format_ok": reward["format"] == format_max, **reward}


def readable_calls(output: str) -> list[dict] | None:
    """For the predictions file: the output's calls, None when they do not parse (the reward then
    gives its minimum correctness)."""
    try:
        return ground_truth_calls(output)
    except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's limit
        return None


def summarize_toolrl(rows: list[dict]) -> dict:
    def mean(key):
        values = [float(r[key]) for r in rows if r[key] is not None]
        return sum(values) / len(values) if values else float("nan")
    return {"reward": mean("total"), "format_reward": mean("format"), "correctness_reward": mean("correctness"),
            "format_accuracy": mean("format_ok"), "name_accuracy": mean("names_ok"), "exact_match": mean("correct")}


def load_demo(config: EvalConfig) -> list:
    return load_examples("demo", split=config.demo_split)[:config.limit or None]


def load_apibank(config: EvalConfig) -> list:
    if config.apibank_dir:
        examples = [example for level in apibank.LEVELS for example in
                    load_examples(str(Path(config.apibank_dir) / f"level-{level}-api_processed.json"),
                                  skip_bad_rows=config.skip_bad_rows)]
    else:
        examples = load_examples("apibank")  # the three levels, meta["level"] on each
    by_level = {level: [e for e in examples if e.meta["level"] == level] for level in apibank.LEVELS}
    return [example for level in apibank.LEVELS for example in by_level[level][:config.limit or None]]


def score_apibank(example, output: str) -> dict:
    result = apibank.score_output(output, example.gold)
    return {"id": example.id, "level": example.meta["level"], "output": output, **result}


def summarize_apibank(rows: list[dict]) -> dict:
    return apibank.summarize(group_counts(rows, "level"))


def load_bfcl(config: EvalConfig) -> list:
    return [item for category in config.bfcl_categories.split(",")
            for item in load_category(category.strip(), config.bfcl_dir or None, config.limit or None)]


def score_bfcl(item, output: str) -> dict:
    result = bfcl.score_output(output, item.category, item.functions, item.answers)
    return {"id": item.id, "category": item.category, "output": output, **result}


def summarize_bfcl(rows: list[dict]) -> dict:
    return bfcl.summarize(group_counts(rows, "category"))


def group_counts(rows: list[dict], key: str) -> dict:
    """{row[key]: (correct, total)}, groups in order of first appearance."""
    counts = {}
    for row in rows:
        ok, n = counts.get(row[key], (0, 0))
        counts[row[key]] = (ok + bool(row["correct"]), n + 1)
    return counts


class Benchmark(NamedTuple):
    load: Callable[[EvalConfig], list]
    score: Callable[[object, str], dict]
    summarize: Callable[[list[dict]], dict]


BENCHMARKS = {"toolrl": Benchmark(load_toolrl, score_toolrl, summarize_toolrl),
              "demo": Benchmark(load_demo, score_toolrl, summarize_toolrl),
              "apibank": Benchmark(load_apibank, score_apibank, summarize_apibank),
              "bfcl": Benchmark(load_bfcl, score_bfcl, summarize_bfcl)}


# ---------------------------------------------------------------- generation and files

def generate(model, tokenizer, items: list, config: EvalConfig, progress: bool = True) -> list[str]:
    """Greedy answers, in item order. Batches hold prompts of similar length (sorted), since a
    left-padded batch costs as much as its longest prompt. progress=False: no progress bar."""
    prompts, num_truncated = build_prompts(tokenizer, items, config.max_prompt_tokens)
    if num_truncated:
        print(f"warning: {num_truncated} prompt(s) longer than {config.max_prompt_tokens} tokens were cut from the left")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [""] * len(prompts)
    for start in tqdm(range(0, len(order), config.batch_size), desc="batches", disable=not progress):
        chunk = order[start:start + config.batch_size]
        texts = generate_text(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens=config.max_new_tokens,
                              batch_size=config.batch_size, temperature=0.0)
        for i, text in zip(chunk, texts):
            outputs[i] = text
    return outputs


def read_outputs(path: Path, items: list) -> list[str]:
    """The raw outputs of an earlier run, matched to the items by id."""
    by_id = {row["id"]: row["output"] for row in read_jsonl(path)}
    missing = [item.id for item in items if item.id not in by_id]
    if missing:
        raise ValueError(f"{path} has no output for {len(missing)} item(s), e.g. {missing[0]}")
    return [by_id[item.id] for item in items]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Written whole or not at all (grpo/io.py): a crash mid-write leaves the old file as it was."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def slug(model: str) -> str:
    """A folder name for a model: "Qwen/Qwen2.5-1.5B-Instruct" -> "Qwen_Qwen2.5-1.5B-Instruct"."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", model).strip("_.") or "model"


def format_value(metric: str, value) -> str:
    """Rewards as they are, accuracies in percent (as the paper's tables), counts as integers."""
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if "reward" in metric else f"{100 * value:.2f}"


def results_table(summary: dict) -> list[list[str]]:
    """Rows "benchmark/metric", one column per model; a metric a model lacks shows as "-"."""
    models = list(summary)
    metrics = []
    for results in summary.values():
        for benchmark, values in results.items():
            metrics += [(benchmark, m) for m in values if (benchmark, m) not in metrics]
    rows = [["metric"] + models]
    for benchmark, metric in metrics:
        rows.append([f"{benchmark}/{metric}"] + [
            format_value(metric, summary[m][benchmark][metric]) if metric in summary[m].get(benchmark, {}) else "-"
            for m in models])
    return rows


def paper_table(summary: dict, benchmark: str, labels: dict | None = None) -> list[list[str]]:
    """One row per model, in the shape of the paper's tables: format, tool names, exact match (percent),
    mean reward; for the toolrl-scored benchmarks (toolrl, demo)."""
    rows = [["model", "format", "tool names", "exact match", "reward"]]
    for name, results in summary.items():
        r = results[benchmark]
        rows.append([(labels or {}).get(name, name)] + [format_value(m, r[m]) for m in
                                                       ("format_accuracy", "name_accuracy", "exact_match", "reward")])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]]) + "\n"


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
                     for r in rows)


# ---------------------------------------------------------------- every model on every benchmark

def evaluate_model(name: str, benchmarks: dict[str, list], config: EvalConfig) -> tuple[dict, dict]:
    """Generate (or read back) and score every benchmark for one model -> ({benchmark: metrics}, rescored),
    rescored = {predictions path: rows} that --rescore has yet to write."""
    model = tokenizer = None
    if not config.rescore:
        dtype = torch.bfloat16 if use_bf16(config.bf16, config.device) else torch.float32
        model, tokenizer = load_model_and_tokenizer(name, device=config.device, dtype=dtype,
                                                    trust_remote_code=config.trust_remote_code)
    results, rescored = {}, {}
    for benchmark, items in benchmarks.items():
        path = Path(config.output_dir) / slug(name) / benchmark / "predictions.jsonl"
        print(f"{name} / {benchmark}: {len(items)} items")
        outputs = read_outputs(path, items) if config.rescore else generate(model, tokenizer, items, config)
        rows = [BENCHMARKS[benchmark].score(item, output) for item, output in zip(items, outputs)]
        if config.rescore:
            rescored[path] = rows   # replaced only once everything is scored: a scorer that fails changes no file
        else:
            write_jsonl(path, rows)  # at once: a later crash does not cost this generation
        results[benchmark] = {"num_items": len(rows), **BENCHMARKS[benchmark].summarize(rows)}
    return results, rescored


def benchmark_names(config: EvalConfig) -> list[str]:
    return [b.strip() for b in config.benchmarks.split(",") if b.strip()]


def evaluate(config: EvalConfig, benchmarks: dict[str, list] | None = None) -> dict:
    """Every model on every benchmark of `config` -> {model: {benchmark: metrics}}; writes the predictions,
    summary.json and summary.md under config.output_dir. train.py's end-of-run table comes from here too.
    `benchmarks`: {name: items} already loaded (loaded here otherwise), the same for every model."""
    names = benchmark_names(config)
    if config.device == "auto":
        config = dataclasses.replace(config, device="cuda" if torch.cuda.is_available() else "cpu")
    if benchmarks is None:
        benchmarks = {name: BENCHMARKS[name].load(config) for name in names}
    summary, rescored = {}, {}
    for name in config.model:
        summary[name], model_rescored = evaluate_model(name, benchmarks, config)
        rescored.update(model_rescored)
    for path, rows in rescored.items():
        write_jsonl(path, rows)

    out = Path(config.output_dir)
    atomic_write_text(out / "summary.json",
                      json.dumps({"config": dataclasses.asdict(config), "results": summary}, indent=2))
    atomic_write_text(out / "summary.md", "\n".join(markdown(t) for t in tables(summary, names)))
    return summary


def tables(summary: dict, benchmarks: list[str]) -> list[list[list[str]]]:
    """Every metric (rows) of every model (columns); then, for the toolrl-scored benchmarks, one row per model."""
    return [results_table(summary)] + [paper_table(summary, b) for b in benchmarks
                                       if BENCHMARKS[b].score is score_toolrl]


# ---------------------------------------------------------------- train.py's held-out evaluation

def heldout_config(cfg, device: str, models=(), output_dir: Path | str = "", bf16: bool = False) -> EvalConfig:
    """The EvalConfig of train.py's --eval_data (cfg: its Config): the demo or toolrl benchmark (a file is scored
    as toolrl), with the run's generation and prompt lengths, --eval_limit and precision."""
    # 'validation' (that split of --data, which run.load_data reads) is scored as its benchmark's test split is
    validation = cfg.eval_data == "validation"
    demo = cfg.eval_data == "demo" or validation and cfg.data == "demo"
    return EvalConfig(model=list(models), benchmarks="demo" if demo else "toolrl",
                      demo_split="validation" if validation else "test", output_dir=str(output_dir),
                      limit=cfg.eval_limit,
                      toolrl_data="" if cfg.eval_data in ("demo", "toolrl", "validation") else cfg.eval_data,
                      max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=cfg.max_prompt_length, device=device,
                      bf16="true" if bf16 else "false", trust_remote_code=cfg.trust_remote_code,
                      skip_bad_rows=cfg.skip_bad_rows)


def evaluate_policy(model, tokenizer, items: list, config: EvalConfig) -> dict[str, float]:
    """--eval_every: the policy as it is in memory answers the held-out `items` greedily, scored and summarised as
    eval.py does -> {"eval/<metric>": value, "time/eval": seconds}. generate_text switches the model to eval()
    without gradient checkpointing for the generation and restores both after (grpo/rollout.py)."""
    t0 = time.perf_counter()
    benchmark = BENCHMARKS[config.benchmarks]
    outputs = generate(model, tokenizer, items, config, progress=False)   # its line follows the step's; no bar
    rows = [benchmark.score(item, output) for item, output in zip(items, outputs)]
    return {**{f"eval/{k}": v for k, v in benchmark.summarize(rows).items()}, "time/eval": time.perf_counter() - t0}


def evaluate_heldout(cfg, models: dict[str, str], items: list | None, output_dir: Path, device: str,
                     bf16: bool) -> dict[str, float] | None:
    """The paper's comparison in miniature: each of `models` ({label: path}) answers the held-out `items`
    greedily (predictions and summary in output_dir, as `python eval.py --model ...` writes them). Prints one
    row per model; returns {label: exact match}, or None with --eval_data none."""
    if cfg.eval_data == "none":
        return None
    config = heldout_config(cfg, device, models.values(), output_dir, bf16)
    benchmark = config.benchmarks
    summary = evaluate(config, {benchmark: items})
    print(f"\nheld-out {cfg.eval_data} set, greedy ({output_dir}):\n"
          + plain(paper_table(summary, benchmark, {path: label for label, path in models.items()})))
    return {label: summary[path][benchmark]["exact_match"] for label, path in models.items()}
