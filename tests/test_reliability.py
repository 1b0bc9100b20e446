"""Failure paths: out-of-memory in generation and in the update, and loading that refuses pickles."""
import pytest
import torch

import train
from grpo.model import load_model
from grpo.rollout import generate_rollout
from tests.test_train import SHORT


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

    monkeypatch.setattr(train, "policy_update", oom)
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
