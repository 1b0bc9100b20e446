"""Files: every writer leaves the old file or the new one, never half (grpo/io.py), and the one JSONL reader
(data/jsonl.py) splits on "\\n" only and skips nothing but a cut-off last line.

A kill is simulated by an exception at the worst moment: half the bytes written, or everything written but
not yet renamed. What a kill leaves is what the exception leaves, minus the clean-up of the `.tmp-*` name,
which the next write of that name does instead."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

import eval as eval_py
from grpo import evaluation
from data import load_examples
from data.jsonl import read_jsonl
from grpo.io import atomic_path, atomic_write_text
from grpo.report import StepLog, plot_rewards
from grpo.tiny import save_tiny_model
from tests.test_data import GOOD_OUTPUT

# Characters str.splitlines() splits on but JSON writes raw inside strings (with ensure_ascii=False).
SEPARATORS = "a\u2028b\u0085c\u2029d"


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` in the code under test catches it."""


def write_half_then_die(path, data, **kwargs) -> None:
    Path(path).write_bytes(data[:len(data) // 2] if isinstance(data, bytes) else data[:len(data) // 2].encode())
    raise Killed


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".tmp-*"))


# ---------------------------------------------------------------- the reader

def test_line_separators_inside_strings_read_back_exactly(tmp_path):
    rows = [{"step": 1, "completion": SEPARATORS}, {"step": 2, "completion": "plain"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 5          # what the old readers split into
    assert read_jsonl(path) == rows


def test_a_cut_off_last_line_is_skipped_with_a_message(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}\n{"step": 3, "rew')         # killed while appending step 3
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert f"{path}: ignoring line 4" in capsys.readouterr().out
    path.write_bytes('{"a": "é"}\n{"a": "é"}'.encode()[:-3])                 # cut inside a 2-byte character
    assert read_jsonl(path) == [{"a": "é"}]


@pytest.mark.parametrize("data, line", [
    (b'{"step": 1}\n\n{"step": 2, "rew\n{"step": 3}\n', 3),                 # lines are counted blank ones included
    (b'{"step": 1}\n{"step": 2, "rew\n', 2),                                # ends with "\n": written whole, so bad
    (b'{"step": 1}\n{"a": "\xff"}\n{"step": 3}\n', 2),                      # not UTF-8
])
def test_a_bad_line_that_is_not_a_cut_off_last_line_raises_naming_it(tmp_path, data, line):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"line {line} is not valid JSON") as error:
        read_jsonl(path)
    assert str(path) in str(error.value)


def test_crlf_line_ends_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"a": 2}\r\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_data_rows_with_line_separators_load(tmp_path):
    path = tmp_path / "mine.jsonl"
    row = {"id": "r", "messages": [{"role": "user", "content": SEPARATORS}], "ground_truth": GOOD_OUTPUT}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    [example] = load_examples(str(path))
    assert example.messages[-1]["content"] == SEPARATORS


def test_predictions_with_line_separators_read_back_for_rescore(tmp_path):
    path = tmp_path / "predictions.jsonl"
    evaluation.write_jsonl(path, [{"id": "q1", "output": "plain"}, {"id": "q0", "output": SEPARATORS}])
    assert "\u2028" in path.read_text(encoding="utf-8")                      # written raw, as the model wrote it
    items = [SimpleNamespace(id="q0"), SimpleNamespace(id="q1")]
    assert evaluation.read_outputs(path, items) == [SEPARATORS, "plain"]


def test_metrics_and_samples_with_line_separators_survive_a_resume(tmp_path):
    rows = [{"step": s, "completion": SEPARATORS} for s in (1, 2, 3)]
    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    StepLog(tmp_path, max_steps=5, start_step=2)                             # resumed at step 2: step 3 is dropped
    assert read_jsonl(tmp_path / "metrics.jsonl") == read_jsonl(tmp_path / "samples.jsonl") == rows[:2]


# ---------------------------------------------------------------- the writers, killed

def test_atomic_write_killed_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "train_config.json"
    path.write_text("old")

    def killed(src, dst):                    # everything written to the temporary name, the rename never done
        raise Killed

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(Killed):
        atomic_write_text(path, "new" * 1000)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_atomic_path_replaces_a_directory_whole(tmp_path):
    path = tmp_path / "model"
    for version in ("old", "new"):
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / f"{version}.txt").write_text(version)
            assert not (path / f"{version}.txt").exists()                    # nothing under the real name yet
    assert [p.name for p in path.iterdir()] == ["new.txt"] and leftovers(tmp_path) == []


def test_steplog_rewrite_killed_halfway_leaves_the_old_metrics(tmp_path, monkeypatch):
    old = "".join(json.dumps({"step": s, "reward": 0.5}) + "\n" for s in (1, 2, 3, 4))
    (tmp_path / "metrics.jsonl").write_text(old)
    monkeypatch.setattr(Path, "write_text", write_half_then_die)
    with pytest.raises(Killed):
        StepLog(tmp_path, max_steps=5, start_step=2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == old and leftovers(tmp_path) == []


def test_eval_predictions_killed_halfway_leave_the_old_file(tmp_path):
    path = tmp_path / "m" / "toolrl" / "predictions.jsonl"
    evaluation.write_jsonl(path, [{"id": f"q{i}", "output": "old"} for i in range(4)])
    old = path.read_bytes()
    rows = [{"id": "q0", "output": "new"}, {"id": "q1", "output": "new"}, {"id": "q2", "output": object()}]
    with pytest.raises(TypeError):           # the third row cannot be written: the file is half done
        evaluation.write_jsonl(path, rows)
    assert path.read_bytes() == old and leftovers(tmp_path) == []


def test_rescore_that_fails_halfway_leaves_every_prediction_file_as_it_was(tmp_path, monkeypatch):
    """Two benchmarks; the scorer raises on the second one's second item. Without scoring everything
    first, the first benchmark's file would already be rewritten."""
    items = [SimpleNamespace(id=f"q{i}") for i in range(4)]
    scored = []

    def score(item, output):
        scored.append(item.id)
        if len(scored) == 6:
            raise RuntimeError("a scorer bug")
        return {"id": item.id, "output": output, "correct": True}

    benchmark = evaluation.Benchmark(lambda config: items, score, lambda rows: {})
    monkeypatch.setattr(evaluation, "BENCHMARKS", {"first": benchmark, "second": benchmark})
    before = {}
    for name in ("first", "second"):
        path = tmp_path / "m_one" / name / "predictions.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps({"id": i.id, "output": "old"}) + "\n" for i in items))
        before[path] = path.read_bytes()
    config = evaluation.EvalConfig(model=["m/one"], output_dir=str(tmp_path), benchmarks="first,second",
                                   rescore=True, device="cpu")
    with pytest.raises(RuntimeError, match="a scorer bug"):
        eval_py.main(config)
    assert {path: path.read_bytes() for path in before} == before
    assert leftovers(tmp_path) == [] and not (tmp_path / "summary.json").exists()
    scored.clear()
    score_all = evaluation.Benchmark(lambda config: items, lambda item, output: {"id": item.id, "output": output,
                                                                                "correct": True}, lambda rows: {})
    monkeypatch.setattr(evaluation, "BENCHMARKS", {"first": score_all, "second": score_all})
    eval_py.main(config)                  # once the scorer works, every file is rescored
    for path in before:
        assert read_jsonl(path) == [{"id": i.id, "output": "old", "correct": True} for i in items]


def test_plot_killed_halfway_leaves_the_old_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in (1, 2)))
    plot = plot_rewards(tmp_path)
    old = plot.read_bytes()
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kwargs: write_half_then_die(path, b"\x89PNG" * 100))
    with pytest.raises(Killed):
        plot_rewards(tmp_path)
    assert plot.read_bytes() == old and leftovers(tmp_path) == []


def test_save_tiny_model_killed_halfway_leaves_no_config_without_weights(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def config_then_die(self, directory, **kwargs):   # config.json written, the weights never
        self.config.save_pretrained(directory)
        raise Killed

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", config_then_die)
    with pytest.raises(Killed):
        save_tiny_model(tmp_path / "tiny-init", texts=["hello world"])
    assert not (tmp_path / "tiny-init").exists() and leftovers(tmp_path) == []
