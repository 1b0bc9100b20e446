"""Failure paths: out-of-memory in generation and in the update, loading that refuses pickles, and
checkpoints and models that are not whole."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from grpo import checkpoint as ckpt
from grpo import update
from grpo.model import load_model, load_tokenizer
from grpo.rollout import generate_rollout
from tests.test_train import SHORT, snapshot


def test_generation_oom_halves_the_sub_batch_and_retries(tiny_model_dir, capsys):
    model = load_model(str(tiny_model_dir))
    real_generate, calls = model.generate, []

    def generate(input_ids, **kwargs):        # pretend only 2 rows fit in memory
        calls.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_generate(input_ids=input_ids, **kwargs)

    model.generate = generate
    rollout = generate_rollout(model, [[5, 6, 7]] * 6, num_generations=2, max_new_tokens=3, temperature=1.0,
                               eos_ids=[2], pad_id=0, batch_size=12)
    failed = [n for n in calls if n > 2]
    assert failed and all(b < a for a, b in zip(failed, failed[1:]))   # each failure shrinks the sub-batch
    assert rollout.input_ids.shape[0] == 12 and max(calls[len(failed):]) <= 2
    assert "retrying with" in capsys.readouterr().out


def test_update_oom_names_the_knobs(tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(update, "_policy_update", oom)     # the update itself runs out
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--max_steps", "1"] + SHORT)
    assert "--micro_batch_size" in str(e.value) and "--max_new_tokens" in str(e.value)


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    """Only safetensors load: unpickling a .bin can run arbitrary code."""
    model = load_model(str(tiny_model_dir))
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception) as e:
        load_model(str(tmp_path))
    assert "safetensors" in str(e.value).lower() or "model.safetensors" in str(e.value)


# ---------------------------------------------------------------- checkpoints: used only when whole

@pytest.fixture(scope="module")
def good_checkpoint(tiny_model_dir, tmp_path_factory):
    """checkpoint-000004 of the tiny model, written by the trainer's own save_checkpoint."""
    model = load_model(str(tiny_model_dir))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("run"), 4, model, load_tokenizer(str(tiny_model_dir)),
                                optimizer, constant(optimizer), json.dumps({"seed": 0}), keep=2)


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def rewrite_weights(checkpoint: Path, change) -> None:
    weights = load_file(checkpoint / "model.safetensors")
    save_file(change(weights), checkpoint / "model.safetensors", metadata={"format": "pt"})


def drop(key: str):
    def damage(checkpoint: Path) -> None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        del state[key]
        torch.save(state, checkpoint / "trainer_state.pt")
    return damage


# The tiny model has 26 tensors in its file: lm_head.weight is tied to the input embedding, so it is not saved.
DAMAGE = {
    "half the tensors": (lambda c: rewrite_weights(c, lambda w: {k: w[k] for k in sorted(w)[::2]}),
                         "the weights lack 13 of the model's 26 tensors"),
    "no tensors": (lambda c: rewrite_weights(c, lambda w: {}), "the weights lack 26 of the model's 26 tensors"),
    "a wrong shape": (lambda c: rewrite_weights(c, lambda w: {**w, "model.norm.weight": w["model.norm.weight"][:-1]}),
                      "model.norm.weight is F32 [63] in the weights; config.json makes it F32 [64]"),
    "a wrong dtype": (lambda c: rewrite_weights(c, lambda w: {**w, "model.norm.weight": w["model.norm.weight"].half()}),
                      "model.norm.weight is F16 [64] in the weights; config.json makes it F32 [64]"),
    "an extra tensor": (lambda c: rewrite_weights(c, lambda w: {**w, "extra.weight": torch.ones(2)}),
                        "the weights hold 1 tensor(s) the model lacks (e.g. extra.weight)"),
    "an empty config": (lambda c: (c / "config.json").write_text("{}"), "model_type"),
    "no optimizer state": (drop("optimizer"), "trainer_state.pt has no 'optimizer'"),
    "no scheduler state": (drop("scheduler"), "trainer_state.pt has no 'scheduler'"),
    "no trainer state": (lambda c: (c / "trainer_state.pt").unlink(), "missing trainer_state.pt"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_that_is_not_whole_is_reported_and_the_older_one_used(good_checkpoint, tmp_path, capsys, damage):
    break_it, reason = DAMAGE[damage]
    shutil.copytree(good_checkpoint, tmp_path / "checkpoint-000004")
    newer = tmp_path / "checkpoint-000006"
    shutil.copytree(good_checkpoint, newer)
    break_it(newer)
    found, state = ckpt.find_resumable(tmp_path)
    assert found == tmp_path / "checkpoint-000004" and state["step"] == 4 and "optimizer" in state
    [line] = [line for line in capsys.readouterr().out.splitlines() if "checkpoint" in line]
    assert line.startswith(f"skipping unusable checkpoint {newer}: ") and reason in line


def test_a_whole_checkpoint_loads_as_saved(good_checkpoint):
    found, state = ckpt.find_resumable(good_checkpoint)
    assert found == good_checkpoint and state["step"] == 4
    assert set(state["optimizer"]) == {"state", "param_groups"}


def test_a_save_killed_midway_leaves_the_older_checkpoint_alone(good_checkpoint, tiny_model_dir, monkeypatch):
    """Killed while writing the trainer state, after the weights: no checkpoint-000005, no .tmp-* left."""
    run = good_checkpoint.parent
    model = load_model(str(tiny_model_dir))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        optimizer = torch.optim.AdamW(model.parameters())
        ckpt.save_checkpoint(run, 5, model, load_tokenizer(str(tiny_model_dir)), optimizer, constant(optimizer), "{}",
                             keep=2)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000004"]


@pytest.mark.parametrize("change, kind", [(lambda w: {k: w[k] for k in sorted(w)[::2]}, "missing keys: 13"),
                                          (lambda w: {**w, "extra.weight": torch.ones(2)}, "unexpected keys: 1")],
                         ids=["missing", "unexpected"])
def test_loading_a_model_with_missing_or_extra_weights_raises(tiny_model_dir, tmp_path, change, kind):
    """transformers would fill missing weights with random values and only warn."""
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    rewrite_weights(tmp_path / "model", change)
    with pytest.raises(ValueError, match=f"the weights do not fit the model: {kind}"):
        load_model(str(tmp_path / "model"))


# ---------------------------------------------------------------- resuming and pruning never lose a run

def test_pruning_removes_only_older_checkpoints(good_checkpoint, tiny_model_dir, tmp_path):
    """Saving step 12 with keep=2 keeps 12 and 8, removes 5; 50 and 60 (later steps) are not its to remove."""
    for step in (5, 8, 50, 60):
        (tmp_path / f"checkpoint-{step:06d}").mkdir()
    model = load_model(str(tiny_model_dir))
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save_checkpoint(tmp_path, 12, model, load_tokenizer(str(tiny_model_dir)), optimizer, constant(optimizer), "{}",
                         keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-000060", "checkpoint-000050", "checkpoint-000012", "checkpoint-000008"]


def test_resume_with_no_usable_checkpoint_stops_and_changes_nothing(good_checkpoint, tmp_path, capsys):
    for step, damage in ((4, "no tensors"), (6, "no trainer state")):
        shutil.copytree(good_checkpoint, tmp_path / f"checkpoint-{step:06d}")
        DAMAGE[damage][0](tmp_path / f"checkpoint-{step:06d}")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--resume", str(tmp_path)] + SHORT)
    assert e.value.code == 2
    captured = capsys.readouterr()
    for step, damage in ((4, "no tensors"), (6, "no trainer state")):
        assert f"skipping unusable checkpoint {tmp_path / f'checkpoint-{step:06d}'}: " in captured.out
        assert DAMAGE[damage][1] in captured.out
    assert "none of its 2 checkpoint(s) is usable" in captured.err
    assert snapshot(tmp_path) == before


def test_resume_paths_a_mistyped_one_stops_the_restart_loop_starts_then_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(run), "--resume", str(tmp_path / "rnu")] + SHORT)
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err and not run.exists()
    # a scheduler's restart loop: the same command every time, --resume from the first second of the job
    loop = ["--output_dir", str(run), "--resume", str(run), "--max_steps", "1", "--eval_data", "none"] + SHORT
    train.main(loop)
    assert "no checkpoint there yet; starting from step 0" in capsys.readouterr().out
    train.main(loop)
    assert f"resumed from {run / 'checkpoint-000001'} at step 1" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
