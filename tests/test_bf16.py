"""--bf16 on a CPU: bf16 autocast over float32 master weights through torch.autocast("cpu"), the same code path as
CUDA's (grpo.model.bf16_autocast; the chunk backward follows the device of its tensors).

test_cuda.py's checks are helpers that take the device; here they run with "cpu". Tolerances, bf16 against float32
(bf16 keeps 8 significant bits, a relative rounding step of 2^-8 = 0.4%): each completion token's log-prob within
1% of float32's, each entropy within 0.25 nats, every weight tensor's gradient within 5% of float32's in norm
(measured on this CPU: 0.27%, 0.085 nats, 1.3%).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

import train
from grpo import lora
from grpo.model import bf16_autocast, use_bf16
from test_cuda import check_autocast_dtypes, check_chunk_logprobs


def test_bf16_setting_resolves_per_device():
    assert use_bf16("auto", "cuda") and use_bf16("auto", "cuda:1") and not use_bf16("auto", "cpu")
    assert use_bf16("true", "cpu") and not use_bf16("false", "cuda")
    with bf16_autocast("cpu", True)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    with bf16_autocast("cpu", False)():
        assert not torch.is_autocast_enabled("cpu")


def test_chunk_logprobs_cpu_bf16_against_float32_autograd():
    """The chunked LM head and its hand-written backward under CPU bf16 autocast, with Qwen's 151,936-token
    vocabulary, against float32 full-vocabulary autograd (tolerances in the module docstring)."""
    errors = check_chunk_logprobs("cpu")
    assert errors["logp"] > 0 and errors["grad"] > 0, "bf16 was not used: the errors are float32's"


def test_cpu_bf16_matmuls_with_float32_weights_and_adamw_state(tiny_model_dir):
    """Rollout and update (forward and backward) multiply in bf16 on the CPU; weights and AdamW state stay float32,
    and one AdamW step at lr 1e-6 moves more than 90% of the float32 weights."""
    check_autocast_dtypes(tiny_model_dir, "cpu")


def test_bf16_run_end_to_end(tmp_path):
    """train.py --bf16 true on the CPU, with a reference model (beta > 0) and the warm start: the reference is bf16,
    the saved weights float32, every metric finite, and the end-of-run evaluation ran in bf16."""
    out = tmp_path / "run"
    loaded = []
    real_load = train.load_model

    def load_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        loaded.append(next(model.parameters()).dtype)
        return model

    train.load_model = lora.load_model = load_model          # the policy (train.py), the reference (grpo/lora.py)
    try:
        train.main(["--output_dir", str(out), "--bf16", "true", "--beta", "0.04", "--max_steps", "2",
                    "--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "12", "--sft_steps", "2",
                    "--sft_batch_size", "4"])
    finally:
        train.load_model = lora.load_model = real_load
    assert loaded == [torch.float32, torch.bfloat16]                                   # policy, then reference
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r[k])) for r in rows for k in ("loss", "kl", "grad_norm", "reward"))
    assert all(w.dtype == torch.float32 for w in load_file(out / "checkpoint-000002" / "model.safetensors").values())
    assert json.loads((out / "eval" / "summary.json").read_text())["config"]["bf16"] == "true"


@pytest.mark.parametrize("bad", ["yes", "bf16"])
def test_bf16_flag_takes_auto_true_false(bad):
    with pytest.raises(SystemExit):
        train.configure(["--bf16", bad])
