"""--eval_every: the policy in memory, scored on the held-out set by eval.py's own code, as eval.py scores the
checkpoint saved at the same step; the model goes back to training mode after."""
import json

import pytest

import eval as eval_py
import train
from grpo import evaluation
from grpo.model import is_checkpointing, load_model, load_tokenizer, set_checkpointing
from test_train import SHORT, read_metrics

EVAL = ["--eval_data", "demo", "--eval_every", "2", "--eval_limit", "12"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """3 steps, evaluating at step 2 (every 2) and at the last, on the first 12 rows of the demo's test split."""
    out = tmp_path_factory.mktemp("eval_run")
    train.main(["--output_dir", str(out), "--max_steps", "3"] + SHORT + EVAL)
    return out


def test_eval_metrics_every_n_steps_and_at_the_end(eval_run):
    rows = read_metrics(eval_run)
    evaluated = [r["step"] for r in rows if "eval/exact_match" in r]
    assert evaluated == [2, 3]                               # step 2, then the last step
    keys = {"eval/reward", "eval/format_reward", "eval/correctness_reward", "eval/format_accuracy",
            "eval/name_accuracy", "eval/exact_match", "time/eval"}
    assert keys <= rows[1].keys() and not keys & rows[0].keys()
    assert rows[1]["time/eval"] > 0


def test_eval_during_training_equals_eval_py_on_the_checkpoint(eval_run, tmp_path):
    """Step 3's in-memory evaluation equals eval.py on checkpoint-000003 (same weights, same code, same 12 rows),
    and the end-of-run table, which --eval_limit caps too."""
    final = str(eval_run / "checkpoint-000003")
    ours = eval_py.main(eval_py.EvalConfig(model=[final], benchmarks="demo", output_dir=str(tmp_path), limit=12,
                                           max_new_tokens=12, max_prompt_tokens=512, device="cpu"))[final]["demo"]
    end_of_run = json.loads((eval_run / "eval" / "summary.json").read_text())["results"][final]["demo"]
    assert ours == end_of_run and ours["num_items"] == 12
    during = read_metrics(eval_run)[-1]
    assert {k: during[f"eval/{k}"] for k in ours if k != "num_items"} == {k: v for k, v in ours.items()
                                                                          if k != "num_items"}


def test_eval_restores_training_mode(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir)).train(), load_tokenizer(str(tiny_model_dir))
    set_checkpointing(model, True)
    cfg = train.configure(["--model", str(tiny_model_dir), "--data", "demo", "--max_new_tokens", "8",
                           "--max_prompt_length", "512", "--eval_limit", "3"])
    config = evaluation.heldout_config(cfg, "cpu")
    items = evaluation.BENCHMARKS[config.benchmarks].load(config)
    metrics = evaluation.evaluate_policy(model, tokenizer, items, config)
    assert metrics["eval/format_accuracy"] == 0.0 and metrics["time/eval"] > 0    # a random model: no format
    assert model.training and is_checkpointing(model)


def test_eval_every_needs_a_held_out_set(capsys):
    with pytest.raises(SystemExit) as e:
        train.configure(["--eval_data", "none", "--eval_every", "5"])
    assert e.value.code == 2 and "--eval_every 5 needs a held-out set" in capsys.readouterr().err
    assert train.configure(["--eval_data", "none"]).eval_every == 0   # the default 10, with nothing to run
    assert train.configure([]).eval_every == 10 and train.configure(["--model", "x/y"]).eval_every == 10
    assert train.configure(["--model", "x/y", "--data", "rows.jsonl"]).eval_every == 0     # a file: no split


def test_evaluating_does_not_change_the_run(eval_run, tmp_path):
    """The same 3 steps without --eval_every: the same weights and rewards (greedy decoding draws no random
    numbers, and every step reseeds its sampling anyway)."""
    from safetensors.torch import load_file
    train.main(["--output_dir", str(tmp_path), "--max_steps", "3", "--eval_data", "none"] + SHORT)
    a, b = (load_file(run / "checkpoint-000003" / "model.safetensors") for run in (eval_run, tmp_path))
    assert all(a[k].equal(b[k]) for k in a)
    assert [r["reward"] for r in read_metrics(tmp_path)] == [r["reward"] for r in read_metrics(eval_run)]
