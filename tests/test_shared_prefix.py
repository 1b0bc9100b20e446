"""grpo/shared_prefix.py: each prompt computed once, against CompletionLogprobs computing it once per row.

Every check compares the two paths on the same weights and rows (float32, tight): log-probs, entropies, and the
gradient of a GRPO-like loss with respect to every parameter; on the tiny model and on random Llama-, Qwen2- and
Qwen3-shaped models; with prompts and completions of different lengths and groups cut short.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from grpo import dist
from grpo.logprobs import CompletionLogprobs
from grpo.model import set_checkpointing
from grpo.shared_prefix import (SharedPromptLogprobs, completion_rows, real_positions, split_prompts,
                                supports_shared_prefix)
from grpo.tiny import build_model

torch.set_num_threads(1)
VOCAB = 300
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                 "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def random_model(kind: str, tokenizer=None, attention: str = "sdpa", seed: int = 0):
    """2 layers, hidden 64, 4 heads / 2 KV heads, untied LM head; "tiny" is grpo/tiny.py's (tied, Qwen2)."""
    torch.manual_seed(seed)
    if kind == "tiny":
        return build_model(tokenizer, seed=seed)
    config_class, model_class = ARCHITECTURES[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, head_dim=16, tie_word_embeddings=False,
                          attn_implementation=attention)
    return model_class(config)


@pytest.fixture(params=["tiny", "llama", "qwen2", "qwen3"])
def model(request, tiny_tokenizer):
    return random_model(request.param, tiny_tokenizer)


def group_batch(vocab: int, prompt_lengths=(9, 4, 7, 6), group_sizes=(3, 3, 1, 2), T=7, seed=0):
    """Rollout-shaped rows: groups of consecutive rows sharing a left-padded prompt (different lengths, the last
    groups cut short as a micro-batch boundary or a skipped row leaves them), completions right-padded, ending at
    different lengths (one after its first token: an immediate EOS)."""
    g = torch.Generator().manual_seed(seed)
    P = max(prompt_lengths)
    ids, attn, comp = [], [], []
    for length, size in zip(prompt_lengths, group_sizes):
        prompt = torch.randint(3, vocab, (P,), generator=g)
        for _ in range(size):
            ids.append(torch.cat([prompt, torch.randint(3, vocab, (T,), generator=g)]))
            attn.append(torch.cat([torch.arange(P) >= P - length, torch.zeros(T, dtype=torch.bool)]))
            comp.append(torch.arange(T) < [T, 1, 4, 5, 2, 6][len(comp) % 6])
    ids, attn, comp = torch.stack(ids), torch.stack(attn).long(), torch.stack(comp)
    attn[:, P:] = comp.long()                           # Rollout: 1 on completion tokens through EOS
    return ids, attn, comp


def grpo_like_loss(logp, entropy, seed=0):
    """sum(logp * w) + 0.1 * sum(entropy), w a different weight per token (an advantage-times-ratio stand-in)."""
    w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed))
    return (logp * w).sum() + 0.1 * entropy.sum()


def parameter_grads(model, policy, batch, temperature=0.9):
    logp, entropy = policy(*batch, temperature)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(grpo_like_loss(logp, entropy), params, allow_unused=True)


def assert_grads_equal(ours, reference, rtol=1e-5):
    for g, r in zip(ours, reference):
        if r is None:                                  # a parameter no log-prob depends on
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * float(r.abs().max()))


def test_split_prompts_finds_groups_of_consecutive_rows():
    # prompts A A B A' C C: A' has A's ids but one more padding column, so it is a prompt of its own
    ids = torch.tensor([[5, 6, 1], [5, 6, 2], [7, 8, 3], [5, 6, 4], [9, 9, 5], [9, 9, 6]])
    attn = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    prompt_ids, prompt_mask, counts = split_prompts(ids, attn, torch.ones(6, 1, dtype=torch.bool))
    assert counts.tolist() == [2, 1, 1, 2]
    assert prompt_ids.tolist() == [[5, 6], [7, 8], [5, 6], [9, 9]]
    assert prompt_mask.tolist() == [[1, 1], [1, 1], [0, 1], [1, 1]]


def test_completion_rows_lay_a_groups_completions_end_to_end():
    """Group 0: completions of 3 and 1 tokens after a 5-token prompt; group 1: one of 2 tokens after 4. Each
    completion's tokens but its last are inputs, at positions continuing its prompt, with no padding between them;
    the state before token 0 is the prompt's last (index k), before token j the row's input j - 1."""
    ids = torch.tensor([[11, 12, 13], [21, 0, 0], [31, 32, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]).bool()
    rows, positions, segment, index = completion_rows(ids, mask, torch.tensor([2, 1]), torch.tensor([5, 4]))
    assert rows.tolist() == [[11, 12], [31, 0]]
    assert positions.tolist() == [[5, 6], [4, 0]]
    assert segment.tolist() == [[0, 0], [2, -1]]
    # flat states: [prompt 0 last, prompt 1 last, row 0 (2 states), row 1 (2 states)]
    assert index.tolist() == [[0, 2, 3], [0, 0, 0], [1, 4, 0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_equal_the_padded_path(model, temperature):
    batch = group_batch(model.config.vocab_size)
    with torch.no_grad():
        ref_logp, ref_ent = CompletionLogprobs(model, 5)(*batch, temperature)
        logp, ent = SharedPromptLogprobs(model, 5)(*batch, temperature)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    assert (logp[~batch[2]] == 0).all() and (ent[~batch[2]] == 0).all()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_equal_the_padded_path(model, checkpointing):
    """The shared prompt's gradient is the sum over its rows: the same as computing the prompt once per row."""
    model.train()
    set_checkpointing(model, checkpointing)
    batch = group_batch(model.config.vocab_size)
    reference = parameter_grads(model, CompletionLogprobs(model, 5), batch)
    ours = parameter_grads(model, SharedPromptLogprobs(model, 5), batch)
    assert_grads_equal(ours, reference)


def test_checkpointed_layers_replay_with_the_cache():
    """With checkpointing the decoder layers run twice (forward, then again in backward) and the prompt's
    keys/values stay in their cache both times: each MLP starts once per pass forward and once more in backward
    (a pre-hook: the replay stops once it has what backward needs, before the MLP's end)."""
    model = random_model("llama")
    model.train()
    set_checkpointing(model, True)
    calls = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    logp, entropy = SharedPromptLogprobs(model)(*group_batch(VOCAB), 1.0)
    assert len(calls) == 2 * 2                          # 2 layers x (prompt pass, completion pass)
    grpo_like_loss(logp, entropy).backward()
    assert len(calls) == 2 * 2 * 2                      # replayed in backward


def test_no_shared_prompt_and_one_token_completions():
    """Edge cases: every row its own prompt (one pass, as CompletionLogprobs) and T = 1 (no completion pass)."""
    model = random_model("qwen2")
    for batch in (group_batch(VOCAB, group_sizes=(1, 1, 1, 1)), group_batch(VOCAB, T=1)):
        reference = parameter_grads(model, CompletionLogprobs(model), batch)
        ours = parameter_grads(model, SharedPromptLogprobs(model), batch)
        assert_grads_equal(ours, reference)


def test_eager_attention_equals_the_padded_path():
    model = random_model("llama", attention="eager")
    batch = group_batch(VOCAB)
    assert_grads_equal(parameter_grads(model, SharedPromptLogprobs(model), batch),
                       parameter_grads(model, CompletionLogprobs(model), batch))


def test_bf16_autocast_is_close_to_the_padded_path():
    """bf16 matrix products round differently in the two paths (other shapes, other sums): close, not equal."""
    model = random_model("qwen2")
    batch = group_batch(VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logp, ref_ent = CompletionLogprobs(model)(*batch)
        logp, ent = SharedPromptLogprobs(model)(*batch)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, rtol=0, atol=0.01)     # hiding 5 prompt tokens moves it 0.18
    torch.testing.assert_close(ent, ref_ent, rtol=0, atol=5e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = parameter_grads(model, SharedPromptLogprobs(model), batch)
        reference = parameter_grads(model, CompletionLogprobs(model), batch)
    for g, r in zip(ours, reference):                   # bf16 against float32 differs by ~1% too
        assert (g - r).norm() <= 0.05 * r.norm()


def tiny_with_adapters(tokenizer):
    """The tiny model with LoRA adapters on every decoder linear layer, B random (B = 0 gives A no gradient)."""
    pytest.importorskip("peft")
    from grpo import lora
    model = random_model("tiny", tokenizer)
    lora.add_adapters(model, 4, 8.0, lora.TARGETS, base="tiny")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_the_padded_path(tiny_tokenizer, checkpointing):
    model = tiny_with_adapters(tiny_tokenizer)
    set_checkpointing(model, checkpointing)
    batch = group_batch(model.config.vocab_size)
    ours = parameter_grads(model, SharedPromptLogprobs(model), batch)
    assert len(ours) == 7 * 2 * 2                       # only the adapters train
    assert_grads_equal(ours, parameter_grads(model, CompletionLogprobs(model), batch))


def test_untried_architectures_are_refused():
    sliding = Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, use_sliding_window=True, sliding_window=4,
                          max_window_layers=1)
    model = Qwen2ForCausalLM(sliding)
    assert not supports_shared_prefix(model)
    with pytest.raises(AssertionError, match="use CompletionLogprobs"):
        SharedPromptLogprobs(model)
    assert supports_shared_prefix(random_model("llama"))


def _as_rank(rank: int, port: int, fsdp: bool, path: str):
    torch.set_num_threads(1)                          # safe after a fork
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.setup()
    _rank_grads(rank, fsdp, path)
    # DDP and FSDP are gone with _rank_grads' frame: destroyed after the process group, DDP's reducer would wait
    # (holding the GIL) for a gloo thread that waits for the GIL
    dist.barrier()
    torch.distributed.destroy_process_group()


def _rank_grads(rank: int, fsdp: bool, path: str):
    """Rank r of 2 runs rows [6r, 6r + 6) (groups cut at the boundary) through the wrapped policy, checkpointing on."""
    model = random_model("llama").train()
    set_checkpointing(model, True)
    policy = dist.wrap(SharedPromptLogprobs(model), fsdp)
    ids, attn, comp = group_batch(VOCAB, group_sizes=(3, 4, 3, 2))
    rows = slice(6 * rank, 6 * rank + 6)
    logp, entropy = policy(ids[rows], attn[rows], comp[rows], 0.9)
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(0))[rows]
    (2 * ((logp * w).sum() + 0.1 * entropy.sum())).backward()          # DDP / FSDP average over the 2 ranks
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in policy.parameters()]
    if rank == 0:
        torch.save(grads, path)


@pytest.mark.parametrize("fsdp", [False, True])
def test_ddp_and_fsdp_give_the_single_process_gradient(tmp_path, fsdp):
    """The decoder runs twice per forward (prompts, then completions): DDP's and FSDP2's gradient hooks must still
    give the gradient of the whole batch computed in one process the padded way."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_as_rank, args=(port, fsdp, str(tmp_path / "grads.pt")), nprocs=2, start_method="fork")
    model = random_model("llama").train()
    set_checkpointing(model, True)
    ids, attn, comp = group_batch(VOCAB, group_sizes=(3, 4, 3, 2))
    logp, entropy = CompletionLogprobs(model)(ids, attn, comp, 0.9)
    w = torch.randn(comp.shape, generator=torch.Generator().manual_seed(0))
    reference = torch.autograd.grad((logp * w).sum() + 0.1 * entropy.sum(), list(model.parameters()))
    assert_grads_equal(torch.load(tmp_path / "grads.pt"), reference)


def test_the_update_takes_the_same_step_with_the_prompt_shared(tiny_tokenizer):
    """grpo.update.policy_update, as train.py calls it (two optimizer steps, micro-batches cutting groups, an old
    policy, a KL term): the weights after it are those of the unshared update, and positions_ratio counts each
    prompt once."""
    from dataclasses import replace

    from grpo.config import Config
    from grpo.rollout import Rollout
    from grpo.update import policy_update, rollout_logprobs
    ids, attn, comp = group_batch(VOCAB)                                     # 9 rows, 4 groups
    rollout = Rollout(ids, attn, comp, ~comp.all(dim=1))
    cfg = replace(Config(), steps_per_generation=1, micro_batch_size=4, beta=0.1, entropy_coef=0.01,
                  max_grad_norm=1e9)
    advantages = torch.linspace(-1, 1, len(ids))
    weights, ratios = [], []
    for cls in (CompletionLogprobs, SharedPromptLogprobs):
        model = random_model("llama", tiny_tokenizer)
        policy, reference = cls(model), cls(random_model("llama", tiny_tokenizer, seed=1))
        ref_logp = rollout_logprobs(reference, rollout, cfg, lambda: torch.autocast("cpu", enabled=False))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        stats = policy_update(policy, optimizer, rollout, advantages, None, ref_logp, cfg,
                              lambda: torch.autocast("cpu", enabled=False))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        ratios.append(stats["positions_ratio"])
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    assert ratios[1] < ratios[0]


def test_one_group_per_micro_batch_computes_no_padding():
    """A micro-batch that is one group with an unpadded prompt: the prompt once, each completion's tokens but its
    last, nothing else (positions_ratio 1), however different the completions' lengths."""
    ids, attn, comp = group_batch(VOCAB, prompt_lengths=(9,), group_sizes=(6,))
    policy = SharedPromptLogprobs(random_model("llama"))
    with torch.no_grad():
        policy(ids, attn, comp)
    assert policy.computed_positions == real_positions(ids, attn, comp) == 9 + int(comp.sum()) - 6
