"""LoRA through peft (grpo/lora.py, train.py --lora_r): what trains, the reference, checkpoints, merging."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")
import eval as eval_py  # noqa: E402
from grpo import evaluation  # noqa: E402
import train  # noqa: E402
from conftest import run_then_sigkill  # noqa: E402
from grpo import checkpoint as ckpt  # noqa: E402
from grpo import lora, update  # noqa: E402
from grpo.logprobs import CompletionLogprobs  # noqa: E402
from grpo.model import base_of, load_model, set_checkpointing  # noqa: E402
from grpo.tiny import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# test_train.py's short demo command, with LoRA, a KL term (so the reference is used) and a merged model at the
# end; a high learning rate so that the adapters move well past the tolerances below in 4 steps
SHORT = ["--prompts_per_step", "2", "--num_generations", "2", "--max_new_tokens", "12", "--sft_steps", "2",
         "--sft_batch_size", "4", "--save_every", "1", "--log_samples_every", "1", "--cpu_threads", "1"]
LORA = ["--max_steps", "4", "--lora_r", "4", "--lora_alpha", "8", "--beta", "0.05", "--learning_rate", "1e-2"]


def tiny_adapted(tokenizer, seed=0):
    """(base copy, model with adapters, peft model): the adapters' B drawn at random (not zero), so that the
    adapted model differs from the base and A receives gradients."""
    torch.manual_seed(seed)
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
    base = copy.deepcopy(model)
    peft_model = lora.add_adapters(model, 4, 8.0, lora.TARGETS, base="tiny")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return base, model, peft_model


def batch(vocab: int, n=3, prompt=6, completion=5):
    """Random sequences: (input_ids, attention_mask, completion_mask), the first row with a left-padded prompt
    and the last with a short completion."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (n, prompt + completion), generator=g)
    attention = torch.ones_like(ids)
    attention[0, :2] = 0
    completion_mask = torch.ones(n, completion, dtype=torch.bool)
    completion_mask[-1, 3:] = False
    return ids, attention, completion_mask


@pytest.mark.parametrize("checkpointing,bf16", [(False, False), (True, False), (True, True)])
def test_only_adapter_parameters_receive_gradients(tiny_tokenizer, checkpointing, bf16):
    _, model, _ = tiny_adapted(tiny_tokenizer)
    if checkpointing:
        set_checkpointing(model, True)
    model.train()
    ids, attention, completion_mask = batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logp, entropy = CompletionLogprobs(model)(ids, attention, completion_mask)
    (logp.sum() + entropy.sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    # every targeted layer of both decoder layers: 7 layers x 2 blocks x (A, B)
    assert len(with_grad) == 7 * 2 * 2
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)


def test_reference_with_adapters_off_is_the_base_model(tiny_tokenizer):
    base, model, peft_model = tiny_adapted(tiny_tokenizer)
    ids, attention, completion_mask = batch(model.config.vocab_size)
    policy = CompletionLogprobs(model)
    with torch.no_grad():
        expected, _ = CompletionLogprobs(base)(ids, attention, completion_mask)
        reference, _ = lora.WithoutAdapters(policy, peft_model)(ids, attention, completion_mask)
        adapted, _ = policy(ids, attention, completion_mask)
    assert torch.equal(reference, expected)                  # the same float32 operations: bit-equal
    assert (adapted - expected).abs().max() > 1e-2           # after the block the adapters are back on


def test_new_adapters_start_as_the_base_model(tiny_tokenizer):
    # B = 0 at initialisation (Hu et al. 2021): GRPO's step 0 is the model it starts from, exactly
    torch.manual_seed(0)
    model = build_model(tiny_tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                        intermediate_size=64)
    base = copy.deepcopy(model)
    lora.add_adapters(model, 8, 16.0, "q_proj,v_proj", base="tiny")
    ids, attention, completion_mask = batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(CompletionLogprobs(model)(ids, attention, completion_mask)[0],
                           CompletionLogprobs(base)(ids, attention, completion_mask)[0])


def test_lora_grpo_learns_a_dense_reward():
    """test_train.py's learning test with adapters only (r = 4 on every decoder linear layer, base frozen): reward =
    fraction of completion tokens from the lower half of the vocabulary; starts near 0.5 and must clearly rise
    within 20 GRPO steps of the real update code. (The held-out gain on the demo takes minutes: README.)"""
    from dataclasses import replace
    from grpo.loss import group_advantages
    from grpo.rollout import generate_rollout
    from grpo.tiny import build_tokenizer
    torch.manual_seed(0)
    tok = build_tokenizer(["hello world, the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    model = build_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    # A random model's logits are nearly flat (embeddings of std 0.02 behind a unit-gain final norm: about +-0.1),
    # and no hidden state can spread them: full fine-tuning reshapes the head, frozen-head LoRA cannot. A final
    # norm gain of 30 gives the frozen head a trained model's logit range (+-3) for the adapters to steer.
    model.model.norm.weight.data.fill_(30.0)
    lora.add_adapters(model, 4, 8.0, lora.TARGETS, base="tiny")
    V = model.config.vocab_size
    cfg = replace(train.Config(), steps_per_generation=1, micro_batch_size=64, beta=0.0, entropy_coef=0.0)
    policy = CompletionLogprobs(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    prompts = [tok("hello")["input_ids"], tok("the fox")["input_ids"], tok("dog")["input_ids"], [5]]
    means = []
    for step in range(20):
        rollout = generate_rollout(model, prompts, num_generations=8, max_new_tokens=8, temperature=1.0,
                                   eos_ids=[V + 1], pad_id=0, batch_size=32)     # no EOS: 8 tokens each
        rewards = (rollout.completion_ids < V // 2).float().mean(dim=1)                 # (N,)
        means.append(rewards.mean().item())
        model.train()
        update.policy_update(policy, optimizer, rollout, group_advantages(rewards, 8), None, None, cfg,
                            lambda: torch.autocast("cpu", enabled=False))
    first, last = means[0], sum(means[-5:]) / 5              # the base model's reward; the last 5 steps' mean
    assert last > first + 0.3, f"mean reward went from {first:.2f} to {last:.2f}"   # seen: 0.52 -> 1.00
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)   # base untouched


# ---------------------------------------------------------------- train.py --lora_r end to end

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """One uninterrupted 4-step LoRA run of the short demo command, shared by the tests below."""
    out = tmp_path_factory.mktemp("lora_run")
    train.main(["--output_dir", str(out), "--merge_lora"] + LORA + SHORT)
    return out


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_checkpoint_holds_the_adapters_in_peft_format(lora_run):
    final = lora_run / "checkpoint-000004"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_config.json", "trainer_state.pt"} <= \
        {p.name for p in final.iterdir()}
    assert not (final / "model.safetensors").exists()
    assert base_of(final) == str((lora_run / "sft-init").resolve())   # the warm start: GRPO's start
    state = ckpt.load_trainer_state(final)
    # AdamW state for the adapters alone: 7 layers x 2 decoder blocks x (A, B)
    assert state["step"] == 4 and len(state["optimizer"]["state"]) == 7 * 2 * 2
    assert all(".lora_" in name for name in state["optimizer"]["state"])
    assert all(r["kl"] > 0 for r in read_metrics(lora_run)[1:])             # the reference (adapters off) in use


def test_incomplete_adapter_checkpoints_are_skipped(lora_run, tmp_path, capsys):
    good = tmp_path / "checkpoint-000004"
    good.mkdir()
    for f in (lora_run / "checkpoint-000004").iterdir():
        (good / f.name).write_bytes(f.read_bytes())
    truncated, lacking = tmp_path / "checkpoint-000005", tmp_path / "checkpoint-000006"
    for bad in (truncated, lacking):
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    tensors = load_file(lacking / "adapter_model.safetensors")
    save_file(dict(list(tensors.items())[1:]), lacking / "adapter_model.safetensors")   # one adapter tensor short
    found, state = ckpt.find_resumable(tmp_path)
    assert found == good and state["step"] == 4
    printed = capsys.readouterr().out
    assert f"skipping unusable checkpoint {lacking}: ValueError: the weights lack 1 of the model's 28" in printed
    assert f"skipping unusable checkpoint {truncated}" in printed


def test_merged_model_log_probs_equal_the_adapted_models(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "merged")     # plain transformers, no peft
    adapted = PeftModel.from_pretrained(load_model(str(lora_run / "sft-init")), lora_run / "checkpoint-000004")
    base = load_model(str(lora_run / "sft-init"))
    ids, attention, completion_mask = batch(merged.config.vocab_size)
    with torch.no_grad():
        m, _ = CompletionLogprobs(merged)(ids, attention, completion_mask)
        a, _ = CompletionLogprobs(adapted.base_model.model)(ids, attention, completion_mask)
        b, _ = CompletionLogprobs(base)(ids, attention, completion_mask)
    torch.testing.assert_close(m, a, rtol=0, atol=1e-5)          # W + s B A folded in: float32 rounding only
    assert (a - b).abs().max() > 1e-3                             # the adapters trained: far above that tolerance


def test_eval_py_loads_the_adapter_directory_and_the_merged_model_alike(lora_run, tmp_path):
    # the run's own end-of-run table scored the adapter checkpoint through eval.py; the merged model answers the
    # same prompts with the same greedy outputs
    models = [str(lora_run / "checkpoint-000004"), str(lora_run / "merged")]
    summary = eval_py.main(eval_py.EvalConfig(model=models, benchmarks="demo", output_dir=str(tmp_path), limit=20,
                                              max_new_tokens=12, max_prompt_tokens=512, device="cpu"))
    assert summary[models[0]] == summary[models[1]]
    outputs = [[json.loads(line)["output"] for line in (tmp_path / evaluation.slug(m) / "demo" /
                                                         "predictions.jsonl").read_text().splitlines()]
               for m in models]
    assert outputs[0] == outputs[1]
    in_run = json.loads((lora_run / "eval" / "summary.json").read_text())["results"]
    assert list(in_run)[-1] == models[0]


def test_sigkill_mid_run_then_resume_equals_uninterrupted(lora_run, tmp_path):
    """As test_train.py's kill test, with LoRA: the resumed run's adapters and metrics equal the uninterrupted
    run's, bit for bit (the base comes from sft-init, the adapters and AdamW state from the checkpoint)."""
    args = ["--merge_lora"] + LORA + SHORT
    run_then_sigkill(["--output_dir", str(tmp_path)] + args, when=tmp_path / "checkpoint-000002")
    assert not (tmp_path / "checkpoint-000004").exists()
    train.main(["--output_dir", str(tmp_path), "--resume", str(tmp_path)] + args)
    for name in ("checkpoint-000004/adapter_model.safetensors", "merged/model.safetensors"):
        a, b = load_file(lora_run / name), load_file(tmp_path / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
    for key in ("reward", "kl", "loss", "grad_norm"):
        assert [r[key] for r in read_metrics(tmp_path)] == [r[key] for r in read_metrics(lora_run)], key


def test_resume_needs_the_same_kind_of_checkpoint(lora_run, capsys):
    before = sorted(p.name for p in lora_run.iterdir())
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(lora_run), "--resume", str(lora_run), "--max_steps", "5"] + SHORT)
    assert e.value.code == 2
    assert "holds LoRA adapters: resume it with the --lora_r it was trained with" in capsys.readouterr().err
    assert sorted(p.name for p in lora_run.iterdir()) == before


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,flag", [
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--lora_r", "4", "--lora_alpha", "0"], "--lora_alpha must be > 0"),
    (["--lora_r", "4", "--lora_target_modules", "q_proj,lm_head"], "--lora_target_modules"),
    (["--lora_r", "4", "--lora_target_modules", " , "], "--lora_target_modules"),
    (["--merge_lora"], "--merge_lora needs --lora_r"),
])
def test_bad_lora_arguments_fail_before_loading_anything(args, flag, capsys):
    with pytest.raises(SystemExit) as e:
        train.configure(args)
    [line] = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and line.startswith(f"train.py: error: {flag}")


def test_fsdp_with_lora_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")                   # as under torchrun --nproc_per_node 1
    with pytest.raises(SystemExit) as e:
        train.configure(["--lora_r", "4", "--fsdp"])
    [line] = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and "--fsdp with --lora_r: not supported" in line and "drop --fsdp" in line


def test_without_peft_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)          # `import peft` now raises ImportError
    with pytest.raises(SystemExit) as e:
        train.configure(["--lora_r", "4"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "train.py: error: --lora_r needs peft: pip install peft\n"
    train.configure([])                                      # without --lora_r, peft is never imported


def test_unknown_target_module_fails_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--output_dir", str(tmp_path), "--lora_r", "4", "--lora_target_modules", "q_proj,qkv"] + SHORT)
    assert e.value.code == 2
    assert "--lora_target_modules: no linear layer named qkv in the model's decoder" in capsys.readouterr().err
    assert not (tmp_path / "sft-init").exists()              # stopped before the warm start


def test_bench_memory_plan_counts_lora_state_exactly():
    """bench_grpo.memory_plan with --lora_r: 4 bytes per frozen weight, 12 (weight + AdamW's two moments) and 4
    (gradient) per adapter parameter, against the tensors of the adapted bench model after one optimizer step."""
    sys.path.insert(0, str(REPO / "bench"))
    import bench_grpo
    bc, _ = bench_grpo.parse_config(bench_grpo.Bench, ["--config", "tiny", "--lora_r", "4", "--beta", "0.1"])
    model = bench_grpo.build_model(bc, "cpu")
    lora.add_adapters(model, 4, 8.0, lora.TARGETS, base="tiny")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 1e9     # noqa: E731
    state = nbytes(model.parameters()) + nbytes(s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    plan = bench_grpo.memory_plan(bc, [20] * 8, [8] * 8, "cpu")
    assert plan["terms"]["state"] == pytest.approx(state, rel=1e-12)
    assert plan["terms"]["grads"] == pytest.approx(nbytes(p.grad for p in trained), rel=1e-12)
    assert plan["terms"]["reference"] == 0                   # beta > 0, but the reference is the adapters off


def test_ddp_on_two_ranks_then_resume_in_one_process(tmp_path):
    """DDP over 2 ranks (gloo, forked as torchrun would start them) with LoRA and the reference in use: rank 0
    saves the adapters and the adapters' AdamW state once, and one process resumes from them."""
    from test_distributed import SHORT as DIST_SHORT
    from test_distributed import run_ranks
    args = ["--lora_r", "4", "--beta", "0.1", "--learning_rate", "1e-2"] + DIST_SHORT   # kl well above float32 rounding
    run_ranks(2, train.main, ["--output_dir", str(tmp_path), "--max_steps", "1"] + args)
    state = ckpt.load_trainer_state(tmp_path / "checkpoint-000001")
    assert len(state["optimizer"]["state"]) == 7 * 2 * 2 and all(".lora_" in k for k in state["optimizer"]["state"])
    train.main(["--output_dir", str(tmp_path), "--resume", str(tmp_path), "--max_steps", "2"] + args)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert all(r["kl"] >= 0 for r in read_metrics(tmp_path)) and read_metrics(tmp_path)[1]["kl"] > 0
