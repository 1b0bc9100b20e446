"""grpo/packing.py: sequences end to end in rows, against CompletionLogprobs on the padded batch.

The warm start's loss, -sum log p(target) / targets, computed row by row on packed rows, must equal (float32, tight)
the padded [left-padded prompts | right-padded targets] batch's, values and gradients, on the tiny model and on
random Llama-, Qwen2- and Qwen3-shaped models.
"""
import pytest
import torch

from grpo.logprobs import CompletionLogprobs
from grpo.model import set_checkpointing
from grpo.packing import PackedLogprobs, pack
from grpo.rollout import left_pad
from grpo.tiny import build_model
from test_shared_prefix import VOCAB, assert_grads_equal, random_model, tiny_with_adapters

torch.set_num_threads(1)


@pytest.fixture(params=["tiny", "llama", "qwen2", "qwen3"])
def model(request, tiny_tokenizer):
    return random_model(request.param, tiny_tokenizer)


def sft_examples(vocab: int, prompt_lengths=(5, 9, 3, 12, 7, 1), target_lengths=(4, 1, 6, 2, 5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in prompt_lengths]
    targets = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in target_lengths]
    return prompts, targets


def padded_batch(prompts, targets, pad_id=0):
    """The warm start's batch as train.py builds it: (ids, attention_mask, target_mask)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                      # (n, P)
    T = max(len(t) for t in targets)
    target_ids = torch.tensor([t + [pad_id] * (T - len(t)) for t in targets])
    target_mask = torch.tensor([[j < len(t) for j in range(T)] for t in targets])
    return torch.cat([prompt_ids, target_ids], 1), torch.cat([prompt_mask, target_mask.long()], 1), target_mask


def packed_per_sequence(policy, rows, n, temperature=1.0):
    """log-probs and entropies of each sequence's targets, in the order given to `pack`."""
    logp, entropy = [None] * n, [None] * n
    for row in rows:
        lp, ent = policy(row.input_ids, row.position_ids, row.target_mask, temperature)
        for i, a, b in zip(row.sequences, row.split_targets(lp), row.split_targets(ent)):
            logp[i], entropy[i] = a, b
    return logp, entropy


def test_pack_lays_sequences_end_to_end():
    # lengths 3, 3, 2: first-fit decreasing into rows of 6 -> [seq 0, seq 1], [seq 2]
    rows = pack([[1, 2], [3], [7]], [[4], [5, 6], [8]], row_tokens=6)
    assert [r.sequences for r in rows] == [[0, 1], [2]]
    assert rows[0].input_ids.tolist() == [[1, 2, 4, 3, 5, 6]]
    assert rows[0].position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert rows[0].target_mask.tolist() == [[False, False, True, False, True, True]]
    assert rows[1].input_ids.tolist() == [[7, 8]] and rows[1].target_mask.tolist() == [[False, True]]
    assert [len(r.sequences) for r in pack([[1, 2], [3], [7]], [[4], [5, 6], [8]])] == [1, 1, 1]   # rows of 3


def test_pack_holds_every_sequence_once_and_no_padding():
    prompts, targets = sft_examples(VOCAB, prompt_lengths=range(1, 30, 3), target_lengths=[5, 1, 9] * 3 + [2])
    rows = pack(prompts, targets, row_tokens=40)
    assert sorted(i for r in rows for i in r.sequences) == list(range(len(prompts)))
    assert all(r.input_ids.shape[1] <= 40 for r in rows)
    assert sum(r.input_ids.numel() for r in rows) == sum(len(p) + len(t) for p, t in zip(prompts, targets))
    with pytest.raises(AssertionError, match="needs a token"):
        pack([[]], [[1]])


@pytest.mark.parametrize("row_tokens", [None, 40])
def test_logprobs_and_entropy_equal_the_padded_path(model, row_tokens):
    prompts, targets = sft_examples(model.config.vocab_size)
    with torch.no_grad():
        ref_logp, ref_ent = CompletionLogprobs(model, 5)(*padded_batch(prompts, targets), 0.8)
        logp, ent = packed_per_sequence(PackedLogprobs(model, 5), pack(prompts, targets, row_tokens), len(prompts), 0.8)
    for i, t in enumerate(targets):
        torch.testing.assert_close(logp[i], ref_logp[i, :len(t)], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent[i], ref_ent[i, :len(t)], rtol=1e-5, atol=1e-5)


def sft_grads(model, prompts, targets, packed: bool):
    """Gradient of the warm start's loss, -sum log p(target) / number of targets, one backward per packed row;
    of the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    n_targets = sum(len(t) for t in targets)
    if not packed:
        logp, _ = CompletionLogprobs(model, 5)(*padded_batch(prompts, targets))
        return torch.autograd.grad(-logp.sum() / n_targets, params)
    grads = [torch.zeros_like(p) for p in params]
    for row in pack(prompts, targets, row_tokens=30):
        logp, _ = PackedLogprobs(model, 5)(row.input_ids, row.position_ids, row.target_mask)
        for g, r in zip(grads, torch.autograd.grad(-logp.sum() / n_targets, params)):
            g += r
    return grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_warm_start_gradients_equal_the_padded_path(model, checkpointing):
    model.train()
    set_checkpointing(model, checkpointing)
    prompts, targets = sft_examples(model.config.vocab_size)
    packed, padded = (sft_grads(model, prompts, targets, packed) for packed in (True, False))
    assert_grads_equal(packed, padded)


def test_eager_attention_builds_the_same_block_mask():
    model = random_model("llama", attention="eager")
    prompts, targets = sft_examples(VOCAB)
    packed, padded = (sft_grads(model, prompts, targets, packed) for packed in (True, False))
    assert_grads_equal(packed, padded)


def test_bf16_autocast_is_close_to_the_padded_path():
    model = random_model("qwen2")
    prompts, targets = sft_examples(VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logp, _ = CompletionLogprobs(model)(*padded_batch(prompts, targets))
        logp, _ = packed_per_sequence(PackedLogprobs(model), pack(prompts, targets, 30), len(prompts))
    for i, t in enumerate(targets):
        assert logp[i].dtype == torch.float32
        torch.testing.assert_close(logp[i], ref_logp[i, :len(t)], rtol=0, atol=0.01)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_warm_start_gradients_equal_the_padded_path(tiny_tokenizer, checkpointing):
    model = tiny_with_adapters(tiny_tokenizer)
    set_checkpointing(model, checkpointing)
    prompts, targets = sft_examples(model.config.vocab_size)
    ours = sft_grads(model, prompts, targets, packed=True)
    assert len(ours) == 7 * 2 * 2                       # only the adapters train
    assert_grads_equal(ours, sft_grads(model, prompts, targets, packed=False))


def test_the_warm_start_loss_is_the_same_packed_or_padded(tiny_tokenizer):
    """grpo.sft.supervised_loss, the warm start's step, with --sft_packing true and false: the same loss and the same
    gradient on every weight."""
    from grpo.sft import supervised_loss
    prompts, targets = sft_examples(VOCAB)
    results = []
    for packed in (False, True):
        model = build_model(tiny_tokenizer, seed=0)
        policy = CompletionLogprobs(model, 5)
        loss = supervised_loss(prompts, targets, policy, PackedLogprobs(model, 5) if packed else None, tiny_tokenizer,
                               lambda: torch.autocast("cpu", enabled=False))
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for packed_grad, padded_grad in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(packed_grad, padded_grad, rtol=1e-5, atol=1e-6)
