"""eval.py: known scores from hand-made predictions (--rescore), and one end-to-end run on the tiny model."""
import json
from pathlib import Path

import pytest

from grpo import evaluation
from eval import main
from grpo.evaluation import EvalConfig, results_table, slug
from grpo.cli import parse_config

WEATHER = {"name": "weather", "description": "Weather in a city.", "parameters": {
    "type": "dict", "required": ["city"], "properties": {"city": {"type": "string", "description": "c"}}}}


def write_bfcl_fixture(folder):
    """Two parallel items and two irrelevance items in BFCL's file layout."""
    (folder / "possible_answer").mkdir(parents=True)
    entries = [{"id": f"parallel_{i}", "question": [[{"role": "user", "content": "Weather in Paris and Rome?"}]],
                "function": [WEATHER]} for i in range(2)]
    answers = [{"id": f"parallel_{i}", "ground_truth": [{"weather": {"city": ["Paris"]}}, {"weather": {"city": ["Rome"]}}]}
               for i in range(2)]
    irrelevant = [{"id": f"irrelevance_{i}", "question": [[{"role": "user", "content": "Tell me a joke."}]],
                   "function": [WEATHER]} for i in range(2)]
    for name, rows in [("BFCL_v4_parallel.json", entries), ("possible_answer/BFCL_v4_parallel.json", answers),
                       ("BFCL_v4_irrelevance.json", irrelevant)]:
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def config(tmp_path, shared_data, **overrides):
    settings = dict(model=["m/one"], output_dir=str(tmp_path / "out"), limit=2,
                    toolrl_data=str(shared_data / "toolrl" / "rlla_4k_test.parquet"),
                    apibank_dir=str(shared_data / "apibank"),
                    bfcl_dir=str(write_bfcl_fixture(tmp_path / "bfcl")), bfcl_categories="parallel,irrelevance")
    return EvalConfig(**{**settings, **overrides})


def write_predictions(cfg, benchmark, outputs):
    path = Path(cfg.output_dir) / slug(cfg.model[0]) / benchmark / "predictions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    items = evaluation.BENCHMARKS[benchmark].load(cfg)
    path.write_text("".join(json.dumps({"id": item.id, "output": out(item)}) + "\n" for item, out in zip(items, outputs)))


def call_block(*calls):
    return "<think>x</think>\n<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


def test_rescore_gives_the_known_scores(tmp_path, shared_data):
    cfg = config(tmp_path, shared_data, rescore=True)
    paris = {"name": "weather", "parameters": {"city": "paris"}}  # strings compared after normalisation
    rome = {"name": "weather", "parameters": {"city": "Rome"}}
    # toolrl, limit 2: row 0 (its target makes a call) answered with its target; row 1 (a
    # response-only target) answered with nothing
    write_predictions(cfg, "toolrl", [lambda ex: ex.ground_truth, lambda ex: ""])
    # API-Bank, 2 items per level: the gold call, then the gold parameters alone (which count as a
    # call to the gold name) with an extra key
    write_predictions(cfg, "apibank", [
        lambda ex: call_block(ex.gold) if ex.id.endswith("-0") else
        call_block({**ex.gold["parameters"], "extra": "1"})] * 6)
    # BFCL: parallel right (any order) then one call short; irrelevance: no call, then a call
    write_predictions(cfg, "bfcl", [lambda it: call_block(rome, paris), lambda it: call_block(paris),
                                    lambda it: "<response>no tool fits</response>", lambda it: call_block(paris)])

    results = main(cfg)["m/one"]

    # row 0: 1 (format) + 3 (correctness); row 1: 0 + 0 (no gold call: correctness is 0). Tool names and
    # exact match count row 0 only, the one whose target makes calls.
    assert results["toolrl"] == {"num_items": 2, "reward": (4 + 0) / 2, "format_reward": 0.5,
                                 "correctness_reward": 1.5, "format_accuracy": 0.5, "name_accuracy": 1.0,
                                 "exact_match": 1.0}
    assert results["apibank"] == {"num_items": 6, "level_1": 0.5, "level_2": 0.5, "level_3": 0.5, "overall": 0.5}
    assert results["bfcl"] == {"num_items": 4, "parallel": 0.5, "irrelevance": 0.5}
    rows = [json.loads(line) for line in (tmp_path / "out" / "m_one" / "bfcl" / "predictions.jsonl").open()]
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert rows[0]["category"] == "parallel" and rows[0]["calls"] == [{"weather": {"city": "Rome"}}, {"weather": {"city": "paris"}}]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["results"]["m/one"] == json.loads(json.dumps(results))
    assert "| apibank/overall | 50.00 |" in (tmp_path / "out" / "summary.md").read_text()


def test_rescore_refuses_predictions_with_missing_items(tmp_path, shared_data):
    cfg = config(tmp_path, shared_data, rescore=True, benchmarks="bfcl")
    write_predictions(cfg, "bfcl", [lambda it: ""])  # one row for four items
    with pytest.raises(ValueError, match="no output for 3 item"):
        main(cfg)


def test_table_puts_models_side_by_side():
    summary = {"a": {"apibank": {"num_items": 597, "overall": 0.3065}},
               "b": {"apibank": {"num_items": 597, "overall": 0.6315}, "toolrl": {"reward": 1.25}}}
    assert results_table(summary) == [["metric", "a", "b"], ["apibank/num_items", "597", "597"],
                                      ["apibank/overall", "30.65", "63.15"], ["toolrl/reward", "-", "1.250"]]


def test_end_to_end_on_the_tiny_model(tmp_path, shared_data, tiny_model_dir, capsys):
    cfg = config(tmp_path, shared_data, model=[str(tiny_model_dir)], limit=1, max_new_tokens=4,
                 max_prompt_tokens=64, batch_size=4, device="cpu")
    results = main(cfg)[str(tiny_model_dir)]
    assert [results[b]["num_items"] for b in ("toolrl", "apibank", "bfcl")] == [1, 3, 2]
    for benchmark in ("toolrl", "apibank", "bfcl"):
        rows = [json.loads(line) for line in
                (tmp_path / "out" / slug(str(tiny_model_dir)) / benchmark / "predictions.jsonl").open()]
        assert len(rows) == results[benchmark]["num_items"]
        assert all(isinstance(r["output"], str) and "correct" in r for r in rows)
    assert "apibank/overall" in capsys.readouterr().out


@pytest.mark.parametrize("args,flag", [(["--model", "NoSuchFamily-7B"], "--model"),
                                       (["--model", "Qwen2.5-1.5B-Instruct", "--benchmarks", "nope"], "--benchmarks"),
                                       ([], "--model")])
def test_bad_arguments_fail_before_loading(args, flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(parse_config(EvalConfig, args + ["--output_dir", str(tmp_path)])[0])
    [line] = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and line.startswith("eval.py: error: ") and flag in line
