"""--reward_fn module:function: a reward defined here trains the demo; bad paths and bad rewards fail clearly."""
import json
import math

import pytest

import train
from grpo import run
from rewards import RewardConfig
from rewards.custom import RewardError, reward_terms, score_completions
from test_train import SHORT, read_metrics

HERE = __name__                                     # this module, importable by name (pytest puts tests/ on the path)


def brace_reward(completion: str, ground_truth: str, step: int, config: RewardConfig) -> dict:
    """A toy reward with two named terms: does the completion open a JSON object, and how long is it (chars / 100)."""
    braces = 1.0 if "{" in completion else 0.0
    size = len(completion) / 100
    return {"braces": braces, "size": size, "total": braces - size}


calls = {"n": 0}


def third_call_fails(completion, ground_truth, step, config):
    calls["n"] += 1
    if calls["n"] == 3:
        raise KeyError("no such field")
    return {"total": 0.0}


def nan_on_second(completion, ground_truth, step, config):
    calls["n"] += 1
    return {"total": float("nan") if calls["n"] == 2 else 1.0}


def test_reward_terms_are_means_of_every_named_term():
    scores = [{"a": 1.0, "b": 0.0, "total": 1.0}, {"a": 0.0, "b": 3.0, "total": 3.0}, {"a": 2.0, "total": 2.0}]
    # a: (1 + 0 + 2) / 3 = 1; b: only the first two have it, (0 + 3) / 2 = 1.5; "total" is the reward itself
    assert reward_terms(scores) == {"rewards/a": 1.0, "rewards/b": 1.5}


def test_a_raising_reward_names_itself_and_the_completion():
    calls["n"] = 0
    with pytest.raises(RewardError) as e:
        score_completions(third_call_fails, ["x", "y", "z!", "w"], ["gt"] * 4, 5, RewardConfig())
    message = str(e.value)
    assert f"{HERE}:third_call_fails raised on completion 2 of 4 at step 5" in message
    assert "KeyError" in message and "'z!'" in message
    assert isinstance(e.value.__cause__, KeyError)          # the reward's own traceback stays attached


@pytest.mark.parametrize("returned", [1.0, {"format": 1.0}, {"total": "3"}, None])
def test_a_reward_of_the_wrong_shape_is_an_error(returned):
    with pytest.raises(RewardError, match=r"for completion 0; expected a dict with a number 'total'"):
        score_completions(lambda *a: returned, ["x"], ["gt"], 0, RewardConfig())


def test_a_non_finite_total_is_reported_with_its_index(capsys):
    calls["n"] = 0
    scores = score_completions(nan_on_second, ["a", "b", "c"], ["gt"] * 3, 0, RewardConfig())
    assert math.isnan(scores[1]["total"]) and scores[0]["total"] == 1.0
    assert f"reward {HERE}:nan_on_second returned a non-finite total (nan) for completion(s) [1] of 3" \
        in capsys.readouterr().out


@pytest.mark.parametrize("path,reason", [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    (f"{HERE}:no_such_function", f"module {HERE} has no attribute 'no_such_function'"),
    (f"{HERE}:HERE", "HERE is a str, not a function"),
    ("rewards.toolrl", "expected module:function"),
])
def test_a_bad_reward_path_fails_in_one_line_before_anything_loads(path, reason, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(out), "--reward_fn", path])
    assert e.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"train.py: error: --reward_fn {path!r}: ") and reason in line
    assert not out.exists()                                 # nothing written, no model loaded


def test_the_demo_trains_on_a_reward_defined_here(tmp_path):
    train.main(["--output_dir", str(tmp_path), "--max_steps", "2", "--eval_data", "none",
                "--reward_fn", f"{HERE}:brace_reward"] + SHORT)
    rows = read_metrics(tmp_path)
    assert not any(k in rows[0] for k in ("rewards/format", "rewards/correctness"))     # ToolRL's terms are gone
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for row in samples:                                     # what was logged is this function's score of the text
        assert {k: row[k] for k in ("braces", "size", "total")} == brace_reward(row["completion"], "", 0, None)
    assert json.loads((tmp_path / "train_config.json").read_text())["reward_fn"] == f"{HERE}:brace_reward"
    for r in rows:
        assert r["reward"] == pytest.approx(r["rewards/braces"] - r["rewards/size"])   # total = braces - size


def test_a_reward_that_raises_stops_the_run(tmp_path):
    calls["n"] = 0
    with pytest.raises(RewardError, match=f"{HERE}:third_call_fails raised on completion 2 of 4 at step 0"):
        train.main(["--output_dir", str(tmp_path), "--max_steps", "2", "--eval_data", "none",
                    "--reward_fn", f"{HERE}:third_call_fails"] + SHORT)
    assert not (tmp_path / "metrics.jsonl").read_text()     # stopped in the first step, before logging it


def test_a_resume_may_change_the_tracker_and_evaluation_but_not_the_reward():
    from dataclasses import asdict
    cfg = train.configure(["--report_to", "tensorboard", "--eval_every", "5", "--eval_limit", "20",
                           "--reward_fn", f"{HERE}:brace_reward"])
    saved = {**asdict(cfg), "report_to": "none", "eval_every": 10, "eval_limit": 0,
             "reward_fn": "rewards.toolrl:toolrl_reward"}
    assert run.config_changes(saved, cfg) == {"reward_fn": ["rewards.toolrl:toolrl_reward", f"{HERE}:brace_reward"]}
