"""grpo/logprobs.py, grpo/rollout.py and grpo.update.policy_update on a tiny Qwen2 model, against naive references."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from grpo.logprobs import CompletionLogprobs, position_ids_from_mask
from grpo.model import is_checkpointing, load_model, load_tokenizer, set_checkpointing
from grpo.rollout import (Rollout, completion_mask, eos_token_ids, generate_rollout, left_pad, pad_token_id,
                          sampling_config)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


def encode_prompts(tok, requests):
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
             for c in requests]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def make_batch(vocab, n=5, P=7, T=6, seed=0):
    """Random ids with ragged left-padded prompts and ragged right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, P + T), generator=g)
    attn = torch.ones(n, P + T, dtype=torch.long)
    comp = torch.ones(n, T, dtype=torch.bool)
    for i in range(n):
        attn[i, :i % 3] = 0                    # left padding of the prompt
        comp[i, T - (i % 4):] = False          # completion ends early
        attn[i, P:] = comp[i].long()
    return ids, attn, comp


def naive_logprobs(model, ids, attn, comp, temperature):
    """Full (N, L, V) logits, float32 log_softmax, gather: obviously right, memory-hungry."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    T = comp.shape[1]
    logp = F.log_softmax(logits[:, -T - 1:-1].float() / temperature, dim=-1)
    tok = logp.gather(-1, ids[:, -T:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return tok * comp, ent * comp


@pytest.mark.parametrize("temperature,chunk", [(1.0, 1024), (0.7, 3), (1.3, 1)])
def test_chunked_logprobs_equal_naive(tiny, temperature, chunk):
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size)
    with torch.no_grad():
        logp, ent = CompletionLogprobs(model, chunk)(ids, attn, comp, temperature)
        ref_logp, ref_ent = naive_logprobs(model, ids, attn, comp, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert (logp[~comp] == 0).all()


@pytest.mark.parametrize("temperature,entropy_coef", [(1.0, 0.0), (0.7, 0.01), (1.3, 0.5)])
def test_chunked_logprobs_gradient_equals_naive(tiny, temperature, entropy_coef):
    """The hand-written backward of the LM-head chunks, entropy term included, against autograd on full logits."""
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size)
    weights = torch.linspace(-1, 1, comp.shape[1])                          # a different upstream grad per column

    def grads(logp, ent):
        loss = (logp * weights).sum() - entropy_coef * ent.sum()
        return torch.autograd.grad(loss, list(model.parameters()))

    ours = grads(*CompletionLogprobs(model, 4)(ids, attn, comp, temperature))
    reference = grads(*naive_logprobs(model, ids, attn, comp, temperature))
    for g, r in zip(ours, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature,entropy_in_loss", [(1.0, False), (0.7, True), (1.3, False)])
def test_chunk_backward_equals_autograd_in_float64(temperature, entropy_in_loss):
    """_ChunkLogprobs against autograd through the same expressions (_chunk_logprobs), in float64."""
    from grpo.logprobs import _chunk_logprobs, _ChunkLogprobs
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(50, (11,), generator=g)
    up_logp, up_ent = torch.randn(11, generator=g, dtype=torch.float64), torch.randn(11, generator=g, dtype=torch.float64)
    results = []
    for fn in (_chunk_logprobs, _ChunkLogprobs.apply):
        # both compute the logits in float32 (.float() casts the float64 inputs down): float32 tolerance
        logp, ent = fn(hidden, targets, weight, temperature)
        loss = (logp * up_logp).sum() + ((ent * up_ent).sum() if entropy_in_loss else 0)
        results.append((logp, ent, *torch.autograd.grad(loss, (hidden, weight))))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-4, atol=1e-5)


def test_sequence_logprobs_same_alone_and_in_padded_batch(tiny):
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size, n=6)
    policy = CompletionLogprobs(model)
    with torch.no_grad():
        batch_logp, _ = policy(ids, attn, comp)
        for i in range(len(ids)):
            P = ids.shape[1] - comp.shape[1]
            start = int((attn[i, :P] == 0).sum())                      # strip this row's padding
            t = int(comp[i].sum())
            alone, _ = policy(ids[i:i + 1, start:P + t], attn[i:i + 1, start:P + t], comp[i:i + 1, :t])
            torch.testing.assert_close(alone[0], batch_logp[i, :t], rtol=1e-5, atol=1e-5)


def test_completion_mask_cases():
    EOS, PAD = 2, 0            # PAD == 0 is also an EOS id below, as Qwen's <|endoftext|>
    ids = torch.tensor([
        [5, 6, EOS, PAD, PAD],   # EOS kept, after-EOS masked
        [5, 6, 7, 8, 9],         # no EOS: truncated, everything kept
        [EOS, PAD, PAD, PAD, PAD],  # empty answer: only the EOS
        [5, PAD, 6, EOS, PAD],   # pad id == second EOS id: the first of either ends it
    ])
    mask, truncated = completion_mask(ids, [EOS, PAD])
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False, False]
    mask, _ = completion_mask(ids, [EOS])             # pad not an EOS: row 3 runs to its EOS
    assert mask[3].int().tolist() == [1, 1, 1, 1, 0]


def test_rollout_same_tokens_from_train_mode_with_checkpointing(tiny):
    model, tok = tiny
    prompts = encode_prompts(tok, ["what is the weather in Paris", "book a table"])
    kwargs = dict(num_generations=3, max_new_tokens=12, temperature=1.0, eos_ids=eos_token_ids(model, tok),
                  pad_id=pad_token_id(tok), batch_size=6)
    model.eval()
    torch.manual_seed(7)
    expected = generate_rollout(model, prompts, **kwargs)
    set_checkpointing(model, True)
    model.train()
    torch.manual_seed(7)
    got = generate_rollout(model, prompts, **kwargs)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert model.training and is_checkpointing(model)                   # restored afterwards
    set_checkpointing(model, False)
    model.eval()


def test_model_generation_config_does_not_leak(tiny):
    """The tiny model's generation_config.json has top-k 20, top-p 0.8, temperature 0.7, repetition penalty 1.05.
    Our rollout must sample from softmax(logits / T) and nothing else."""
    model, tok = tiny
    assert model.generation_config.top_k == 20 and model.generation_config.repetition_penalty != 1.0
    config = sampling_config(1.0, 4, eos_token_ids(model, tok), pad_token_id(tok))
    seen = {}
    original = model._get_logits_processor

    def spy(*args, **kwargs):
        processors = original(*args, **kwargs)
        seen["names"] = [type(p).__name__ for p in processors]
        return processors

    model._get_logits_processor = spy
    try:
        generate_rollout(model, encode_prompts(tok, ["hi"]), num_generations=2, max_new_tokens=4, temperature=1.0,
                         eos_ids=config.eos_token_id, pad_id=config.pad_token_id, batch_size=2)
    finally:
        del model._get_logits_processor
    assert not [n for n in seen["names"] if "TopK" in n or "TopP" in n or "Repetition" in n or "Temperature" in n], seen
    assert model.generation_config.top_k == 20                          # the model's own config is restored


def test_rollout_layout_and_masks(tiny):
    model, tok = tiny
    prompts = encode_prompts(tok, ["a", "a much longer request about the weather"])
    torch.manual_seed(0)
    r = generate_rollout(model, prompts, num_generations=2, max_new_tokens=8, temperature=1.0,
                         eos_ids=eos_token_ids(model, tok), pad_id=pad_token_id(tok), batch_size=1)
    ids, mask = left_pad(prompts, pad_token_id(tok))
    P = ids.shape[1]
    assert torch.equal(r.input_ids[:, :P], ids.repeat_interleave(2, 0))            # prompt-major
    assert torch.equal(r.attention_mask[:, P:].bool(), r.completion_mask)
    ref_mask, ref_trunc = completion_mask(r.completion_ids, eos_token_ids(model, tok))
    assert torch.equal(r.completion_mask, ref_mask) and torch.equal(r.truncated, ref_trunc)


def test_select_trims_padding_without_changing_logprobs(tiny):
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size, n=6)
    r = Rollout(ids, attn, comp, ~comp.all(1))
    policy = CompletionLogprobs(model)
    with torch.no_grad():
        full, _ = policy(ids, attn, comp)
        sub = r.select(slice(1, 3))
        part, _ = policy(sub.input_ids, sub.attention_mask, sub.completion_mask)
    assert sub.input_ids.shape[1] < ids.shape[1]
    torch.testing.assert_close(part, full[1:3, :part.shape[1]], rtol=1e-5, atol=1e-5)


def test_microbatch_gradient_equals_full_batch(tiny):
    """One optimizer step of SGD(lr=1) moves the weights by exactly -grad: compare micro-batch sizes."""
    from grpo import update
    from grpo.config import Config
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size, n=8, seed=3)
    rollout = Rollout(ids, attn, comp, ~comp.all(1))
    advantages = torch.linspace(-1, 1, 8)
    cfg = replace(Config(), steps_per_generation=1, max_grad_norm=1e9, beta=0.1, entropy_coef=0.01)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ref_logp = update.rollout_logprobs(CompletionLogprobs(model), rollout, cfg, _no_autocast)
    results = []
    for micro in (8, 3, 1):
        model.load_state_dict(start)
        policy = CompletionLogprobs(model)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        update.policy_update(policy, opt, rollout, advantages, None, ref_logp + 0.05, replace(cfg, micro_batch_size=micro),
                            _no_autocast)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    for other in results[1:]:
        for k in start:
            torch.testing.assert_close(other[k], results[0][k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(results[0][k], start[k]) for k in start)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_skipping_zero_advantage_rows_changes_nothing(tiny):
    """beta = 0, no entropy bonus: zero-advantage rows have exactly zero loss, so skipping them is exact
    (the token count still includes them)."""
    from grpo import update
    from grpo.config import Config
    model, _ = tiny
    ids, attn, comp = make_batch(model.config.vocab_size, n=8, seed=4)
    rollout = Rollout(ids, attn, comp, ~comp.all(1))
    advantages = torch.tensor([0.0, 1.0, 0.0, -0.5, 0.0, 0.0, 2.0, 0.0])
    cfg = replace(Config(), steps_per_generation=2, micro_batch_size=2, max_grad_norm=1e9, beta=0.0,
                  entropy_coef=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    old_logp = update.rollout_logprobs(CompletionLogprobs(model), rollout, cfg, _no_autocast)
    results = []
    for skip in (False, True):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        update.policy_update(CompletionLogprobs(model), opt, rollout, advantages, old_logp, None,
                            replace(cfg, skip_zero_advantage=skip), _no_autocast)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(start)
    for k in start:   # summation order differs between the two: agree to ~1e-7 on updates of ~1e-2
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-6)


def test_micro_batches_take_groups_in_order_of_prompt_length():
    """Groups of 2 rows with prompts of 3, 1, 2 and 1 tokens: a stable sort keeps each group's rows together and in
    order, shortest prompts first, ties in rollout order."""
    from grpo.update import by_prompt_length
    P, T = 3, 2
    attn = torch.ones(8, P + T, dtype=torch.long)
    for row, length in enumerate([3, 3, 1, 1, 2, 2, 1, 1]):
        attn[row, :P - length] = 0
    rollout = Rollout(torch.zeros(8, P + T, dtype=torch.long), attn, torch.ones(8, T, dtype=torch.bool),
                      torch.zeros(8, dtype=torch.bool))
    assert by_prompt_length(rollout, torch.arange(8)).tolist() == [2, 3, 6, 7, 4, 5, 0, 1]
    assert by_prompt_length(rollout, torch.tensor([0, 1, 4, 5])).tolist() == [4, 5, 0, 1]
