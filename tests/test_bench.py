"""bench/bench_grpo.py end to end on a tiny config, and the generation levers it measures against plain `generate`."""
import json
from dataclasses import replace
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_grpo  # noqa: E402
import train  # noqa: E402

from grpo import rollout as R  # noqa: E402
from grpo.model import load_model, load_tokenizer  # noqa: E402


@pytest.fixture
def one_thread():
    """Two threads on a shared 2-core machine can be 100x slower than one (OpenMP waits); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_runs_and_reports(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    bench_grpo.main(["--config", "tiny", "--prompts", "2", "--num_generations", "4", "--prompt_tokens", "24",
                     "--completion_tokens", "8", "--micro_batch_size", "4", "--steps", "2", "--beta", "0.01",
                     "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["phases"]) == {"generation", "reward", "logprobs", "update"}
    assert result["step_time"] > 0 and result["peak_gb"] > 0 and 0 < result["mfu"] < result["hfu"]
    assert result["mean_completion_tokens"] == 8                            # --ignore_eos: every row is T long
    assert result["floor"] > 0


@pytest.fixture(scope="module")
def sharp_tiny(tiny_model_dir):
    """The tiny model with weights scaled up, so that greedy completions vary and end at different steps."""
    model, tok = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30)
    texts = ["hi", "what is the weather in Paris today please", "book a table for two", "a",
             "send an email to bob about the meeting tomorrow at noon", "x y z"]
    return model.eval(), tok, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _padded(x, width, value):
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def test_shared_prefix_sampling_equals_plain_generate(sharp_tiny, one_thread):
    """No row ends (its EOS id is out of the vocabulary): the shared-prefix path draws the same random numbers
    for the same rows as one generate(num_return_sequences=G), so the sampled tokens are identical."""
    model, tok, prompts = sharp_tiny
    kwargs = dict(num_generations=3, max_new_tokens=20, temperature=1.0, eos_ids=[model.config.vocab_size],
                  pad_id=R.pad_token_id(tok), batch_size=9)
    torch.manual_seed(5)
    ours = R.generate_rollout(model, prompts, **kwargs)
    torch.manual_seed(5)
    plain = bench_grpo.plain_generate_rollout(model, prompts, **kwargs)
    assert torch.equal(ours.input_ids, plain.input_ids) and torch.equal(ours.attention_mask, plain.attention_mask)


@pytest.mark.parametrize("segment", [1, 4, 1000])
def test_dropping_finished_rows_changes_no_token(sharp_tiny, segment, one_thread, monkeypatch):
    """Near-greedy sampling, EOS ids chosen so that rows end at different steps: rows leaving the batch (and
    the cache) mid-way must not change any other row's tokens, masks or truncation flags."""
    model, tok, prompts = sharp_tiny
    monkeypatch.setattr(R, "SEGMENT_TOKENS", segment)
    kwargs = dict(num_generations=2, max_new_tokens=40, temperature=1e-6, pad_id=R.pad_token_id(tok), batch_size=4)
    # EOS ids: the token each prompt's completion has at step 4, 9, 14, ... when nothing ends it
    endless = R.generate_rollout(model, prompts, eos_ids=[model.config.vocab_size], **kwargs)
    completions = endless.input_ids[::2, -40:]
    kwargs["eos_ids"] = sorted({int(completions[i, 4 + 5 * i]) for i in range(len(prompts))})
    ours = R.generate_rollout(model, prompts, **kwargs)
    plain = bench_grpo.plain_generate_rollout(model, prompts, **kwargs)
    lengths = plain.completion_mask.sum(1)
    assert lengths.min() < lengths.max() < 40 and not plain.truncated.any()   # the case this test is about
    width = max(ours.completion_mask.shape[1], plain.completion_mask.shape[1])
    assert torch.equal(_padded(ours.completion_mask, width, 0), _padded(plain.completion_mask, width, 0))
    kept = _padded(plain.completion_mask, width, 0)
    ours_ids, plain_ids = _padded(ours.completion_ids, width, 0), _padded(plain.completion_ids, width, 0)
    assert torch.equal(ours_ids[kept], plain_ids[kept]) and torch.equal(ours.truncated, plain.truncated)


def test_compiled_static_cache_generation(sharp_tiny, one_thread):
    """--compile_generation: greedy tokens equal the eager path's, and a second rollout whose prompts have another
    length inside the same power-of-two cache bucket reuses the compiled graph instead of compiling again."""
    from torch._dynamo.utils import counters
    model, tok, prompts = sharp_tiny
    kwargs = dict(num_generations=2, max_new_tokens=12, temperature=0.0, eos_ids=[222, 1252, 833, 1200],
                  pad_id=R.pad_token_id(tok), batch_size=4)
    batches = prompts[1:3], prompts[2:4]
    longest = [max(len(p) for p in batch) for batch in batches]
    cache = [R.static_cache_length(n, kwargs["max_new_tokens"]) for n in longest]
    assert longest[0] != longest[1] and cache[0] == cache[1]                # the case this test is about
    torch._dynamo.reset()
    for i, batch in enumerate(batches):
        eager = R.generate_rollout(model, batch, **kwargs)
        compiled = R.generate_rollout(model, batch, compile=True, **kwargs)
        width = max(eager.completion_mask.shape[1], compiled.completion_mask.shape[1])
        assert torch.equal(_padded(eager.completion_mask, width, 0), _padded(compiled.completion_mask, width, 0))
        assert torch.equal(_padded(eager.completion_ids, width, 0) * _padded(eager.completion_mask, width, 0),
                           _padded(compiled.completion_ids, width, 0) * _padded(compiled.completion_mask, width, 0))
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("baseline", ["checkpointed", "full"])
def test_logprob_baselines_compute_the_same(tiny_model_dir, monkeypatch, baseline):
    """bench --logprobs checkpointed / full, the A/B baselines of grpo.logprobs: same log-probs, entropies and
    weight gradients for a ragged batch as the hand-written chunk backward, entropy bonus included."""
    from grpo import logprobs
    model = load_model(str(tiny_model_dir))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=g)
    attn = torch.ones_like(ids)
    attn[1, :3] = 0                                                          # left padding
    comp = torch.ones(4, 5, dtype=torch.bool)
    comp[2, 3:] = False                                                      # an early end
    attn[2, -2:] = 0                                                         # its tokens after the end
    results = []
    for patched in (False, True):
        if patched and baseline == "checkpointed":
            monkeypatch.setattr(logprobs, "_ChunkLogprobs", bench_grpo.CheckpointedChunk)
        elif patched:
            monkeypatch.setattr(logprobs.CompletionLogprobs, "forward", bench_grpo.full_vocabulary_logprobs)
        logp, ent = logprobs.CompletionLogprobs(model, chunk_size=7)(ids, attn, comp, 0.9)
        loss = (logp * torch.linspace(-1, 1, 5)).sum() - 0.01 * ent.sum()
        results.append((logp.detach(), ent.detach(), *torch.autograd.grad(loss, list(model.parameters()))))
    for ours, ref in zip(results[0], results[1]):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_every_lever_is_valid_bench_flags():
    """bench/levers.py's A/B runs: every workload and lever passes bench_grpo.py's argument parser."""
    import levers
    for workload in levers.WORKLOADS.values():
        for name, (_, phase, both, with_args, without_args, _) in levers.LEVERS.items():
            assert phase in ("generation", "update"), name
            for args in (with_args, without_args):
                bench_grpo.parse_config(bench_grpo.Bench, workload + both + args)


def test_memory_plan_state_terms_are_the_tensors():
    """bench_grpo.memory_plan's exact terms: float32 weights + AdamW's two moments (12 bytes per parameter) and the
    float32 gradients (4), against the tensors of a model after one optimizer step."""
    bc, _ = bench_grpo.parse_config(bench_grpo.Bench, ["--config", "tiny"])
    model = bench_grpo.build_model(bc, "cpu")
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / 1e9     # noqa: E731
    params = list(model.parameters())
    state = nbytes(params) + nbytes(s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    plan = bench_grpo.memory_plan(bc, [20] * 8, [8] * 8, "cpu")
    assert plan["terms"]["state"] == pytest.approx(state, rel=1e-12)
    assert plan["terms"]["grads"] == pytest.approx(nbytes(p.grad for p in params), rel=1e-12)
    assert plan["terms"]["casts"] == 0 and bench_grpo.memory_plan(bc, [20] * 8, [8] * 8, "cuda")["terms"]["casts"] \
        == pytest.approx(nbytes(params) / 2, rel=1e-12)                  # CUDA: a bf16 copy of every weight


def test_memory_plan_trainable_parameters_and_flags():
    """bench/memory.py: its own flags are told apart from train.py's; --trainable_params (LoRA's adapters) scales the
    gradients, AdamW's moments and its step's temporary, never the weights, casts or reference; bf16 follows --bf16."""
    import memory
    own, rest = memory.split_args(["--config", "qwen2.5-0.5b", "--micro_batch_size", "4", "--trainable_params=1000",
                                   "--gradient_checkpointing", "--bf16", "true"])
    assert own == ["--config", "qwen2.5-0.5b", "--trainable_params=1000"]
    assert rest == ["--micro_batch_size", "4", "--gradient_checkpointing", "--bf16", "true"]
    m, _ = memory.parse_config(memory.Memory, own)
    cfg, _ = memory.parse_config(train.Config, rest)
    full = memory.plan_for_flags(memory.parse_config(memory.Memory, ["--config", "qwen2.5-0.5b"])[0], cfg)["terms"]
    lora = memory.plan_for_flags(m, cfg)["terms"]
    n = full["grads"] / 4                                                # GB of one byte per parameter
    assert lora["grads"] == lora["adamw_step"] == pytest.approx(4 * 1000 / 1e9)
    assert lora["state"] == pytest.approx(4 * n + 8 * 1000 / 1e9)                      # float32 weights stay whole
    assert lora["casts"] == full["casts"] == pytest.approx(2 * n) and lora["reference"] == full["reference"]
    assert memory.plan_for_flags(m, replace(cfg, bf16="false"))["terms"]["casts"] == 0
    # one micro-batch per optimizer step: its gradients replace the casts and activations as backward frees them
    one = replace(cfg, prompts_per_step=1, num_generations=2, micro_batch_size=2, steps_per_generation=1)
    single, accumulated = memory.plan_for_flags(m, one), memory.plan_for_flags(m, replace(one, micro_batch_size=1))
    t = single["terms"]
    activations = t["casts"] + t["checkpoints"] + t["layer"] + t["prompt_kv"] + t["lm_head"]
    assert single["backward"] == pytest.approx(t["state"] + t["reference"] + max(t["grads"], activations))
    assert accumulated["accumulates"] and not single["accumulates"]


def test_memory_plan_counts_a_shared_prompt_once_per_group():
    """--shared_prompt: a micro-batch of 8 rows in groups of 4 computes 2 prompts + 8 completions, not 8 rows of
    both, and holds the prompts' keys/values; the unshared plan has no such term."""
    import memory
    from common import ARCHITECTURES
    from transformers import Qwen2Config
    c = Qwen2Config(**ARCHITECTURES["qwen2.5-1.5b"])
    kwargs = dict(num_generations=4, micro_batch_size=8, generation_batch_size=16, logprob_chunk_size=1024, beta=0.0,
                  gradient_checkpointing=True, bf16=True, old_logprobs=False)
    P, T = [2000] * 16, [100] * 16
    shared, padded = (memory.plan(c, P, T, shared_prompt=s, **kwargs)["terms"] for s in (True, False))
    assert shared["layer"] / padded["layer"] == pytest.approx((2 * 2000 + 8 * 100) / (8 * 2100))
    assert shared["checkpoints"] / padded["checkpoints"] == pytest.approx((2 * 2000 + 8 * 100) / (8 * 2100))
    assert padded["prompt_kv"] == 0 and shared["prompt_kv"] > 0
    cut = memory.plan(c, P, T, shared_prompt=True, **{**kwargs, "micro_batch_size": 6})["terms"]   # 6 rows: 2-3 groups
    assert cut["layer"] == pytest.approx(shared["layer"] * (3 * 2000 + 6 * 100) / (2 * 2000 + 8 * 100))


def test_memory_fits_table(capsys):
    """Full fine-tuning of Qwen2.5-1.5B: weights + AdamW + gradients are 16 bytes per parameter, 24.7 GB, so nothing
    fits 24 GB; 80 GB takes a larger micro-batch than 48."""
    import memory
    memory.main(["--config", "qwen2.5-1.5b", "--max_new_tokens", "512", "--max_prompt_length", "1024"])
    rows = {int(line.split()[0]): line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("24", "48", "80", "141")}
    assert rows[24][0] == "none" and rows[24][-1] == "none"
    assert 1 <= int(rows[48][0]) < int(rows[80][0]) <= int(rows[141][0])


def test_prompt_lengths_from_a_lengths_file(tmp_path):
    """--prompt_lengths <lengths file>: each prompt's length is one of the file's counts, cut to --prompt_tokens, drawn
    the same way for the same seed; prompts are exactly that many tokens long."""
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"about": "test", "lengths": [30, 12, 45, 12]}))
    bc, _ = bench_grpo.parse_config(bench_grpo.Bench, ["--prompt_lengths", str(path), "--prompt_tokens", "40"])
    lengths = bench_grpo.prompt_lengths(bc, 50, torch.Generator().manual_seed(0))
    assert set(lengths) == {30, 12, 40}                               # 45 cut to 40
    assert lengths == bench_grpo.prompt_lengths(bc, 50, torch.Generator().manual_seed(0))
    tok = bench_grpo.tokenizer("tiny")
    assert [len(tok(t)["input_ids"]) for t in bench_grpo.prompt_texts(bc, 6)] == \
        bench_grpo.prompt_lengths(bc, 6, torch.Generator().manual_seed(bc.seed))


def test_the_committed_lengths_file():
    """bench/toolrl_prompt_lengths.json, the GPU check's prompt lengths: its summary matches its counts (the counts
    themselves are checked against the tokenizer in test_qwen_tokenizer.py)."""
    import statistics
    content = json.loads((Path(bench_grpo.__file__).parent / "toolrl_prompt_lengths.json").read_text())
    lengths = content["lengths"]
    assert len(lengths) == sum(content["sources"].values()) == 480
    assert (min(lengths), statistics.median(lengths), max(lengths)) == (content["min"], content["median"],
                                                                       content["max"])
    assert bench_grpo.lengths_file(str(Path(bench_grpo.__file__).parent / "toolrl_prompt_lengths.json")) == lengths
