"""What only a CUDA GPU can show (`pytest -m cuda`; every test skips on a machine without one).

- autocast: the rollout and the update run their matrix products in bf16 while the weights, gradients and AdamW
  state stay float32, so that an lr-1e-6 step still moves the weights (docs/PITFALLS.md #7), as train.py sets it up;
- grpo.logprobs' chunked LM head and its hand-written backward under CUDA bf16 autocast, against float32
  full-vocabulary autograd, with Qwen's 151,936-token vocabulary;
- one DDP rank over NCCL: update.policy_update through DistributedDataParallel moves the weights as the plain update;
- --compile_generation (static KV cache, torch.compile, CUDA graphs): greedy tokens equal the eager rollout's, and a
  second rollout reuses the compiled graph. Last, since compiling takes longest.

bench/gpu_quick.sh runs them on the GPU machine. Their CPU counterparts are in test_grpo_model.py (log-probs,
gradients), test_bench.py (compiled generation) and test_distributed.py (DDP and FSDP over gloo). Each test is a
helper that takes the device, so the same code can be exercised on a CPU (with CPU autocast and gloo) by hand.
"""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

import train
from grpo import dist, update
from grpo import rollout as R
from grpo.logprobs import CompletionLogprobs, position_ids_from_mask
from grpo.model import load_model, load_tokenizer, set_checkpointing

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available())")]


def bf16_autocast(device: str):
    """train.py's autocast on a GPU: bf16 compute over float32 master weights."""
    return lambda: torch.autocast(device, dtype=torch.bfloat16)


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of every matrix product and fused attention kernel that runs, as the kernels see them (after
    autocast has cast their inputs); backward's products are seen too, since autograd carries the mode along.
    Attention kernels count their first three tensors (q, k, v; in backward the output's gradient, q, k): their
    saved logsumexp is float32 by design."""

    def __init__(self):
        super().__init__()
        self.dtypes = {}                                         # op name -> set of input dtypes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in ("mm", "addmm", "bmm", "baddbmm") or "attention" in name:
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.dtypes.setdefault(name, set()).update(t.dtype for t in tensors[:3 if "attention" in name else None])
        return func(*args, **(kwargs or {}))


def fixed_rollout(vocab: int, device: str, n: int = 8, P: int = 7, T: int = 6, seed: int = 0) -> R.Rollout:
    """n rows of random ids with ragged left-padded prompts and ragged completions (one of them empty but its EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, P + T), generator=g)
    comp = torch.arange(T)[None, :] < torch.tensor([T, T - 1, 1, 3, T, 2, T - 2, 4][:n])[:, None]   # (n, T)
    attn = torch.cat([torch.ones(n, P, dtype=torch.long), comp.long()], 1)
    attn[::3, :2] = 0                                                                           # left padding
    return R.Rollout(ids.to(device), attn.to(device), comp.to(device), (~comp.all(1)).to(device))


# ---------------------------------------------------------------- autocast: bf16 compute, float32 state

def check_autocast_dtypes(model_dir, device: str) -> None:
    model, tok = load_model(str(model_dir), device=device), load_tokenizer(str(model_dir))
    set_checkpointing(model, True)
    model.train()
    autocast = bf16_autocast(device)
    prompts = [tok(t)["input_ids"] for t in ("hi", "what is the weather in Paris today")]
    with MatmulDtypes() as rollout_ops, autocast():
        rollout = R.generate_rollout(model, prompts, num_generations=4, max_new_tokens=6, temperature=1.0,
                                     eos_ids=R.eos_token_ids(model, tok), pad_id=R.pad_token_id(tok), batch_size=8)
    policy = CompletionLogprobs(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)        # the recipe's lr
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cfg = replace(train.Config(), steps_per_generation=1, micro_batch_size=4, beta=0.0, entropy_coef=0.001)
    advantages = torch.linspace(-1, 1, len(rollout.input_ids), device=device)
    with MatmulDtypes() as update_ops:
        update.policy_update(policy, optimizer, rollout, advantages, None, None, cfg, autocast)
    for phase, ops in (("rollout", rollout_ops), ("update", update_ops)):
        assert ops.dtypes, f"no matrix product seen in the {phase}"
        assert all(d == {torch.bfloat16} for d in ops.dtypes.values()), f"{phase}: {ops.dtypes}"
    assert "mm" in update_ops.dtypes or "addmm" in update_ops.dtypes
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values()), "master weights must stay float32"
    for p in params.values():
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # lr 1e-6 moves a float32 weight of size ~0.02 by far more than its rounding step (~2e-9); in bf16 (step ~1e-4)
    # almost every such update rounds away (docs/PITFALLS.md #7). Elements whose gradient is ~0 may stay put.
    moved = sum(int((params[n].detach() != w).sum()) for n, w in before.items())
    assert moved > 0.9 * sum(w.numel() for w in before.values())


def test_autocast_dtypes(tiny_model_dir):
    """The rollout and the update (forward and backward) multiply in bf16; weights and AdamW state stay float32,
    and one AdamW step at lr 1e-6 changes more than 90% of the float32 weights."""
    check_autocast_dtypes(tiny_model_dir, "cuda")


# ---------------------------------------------------------------- log-probs and gradients: bf16 vs float32

def qwen_vocab_model(device: str) -> Qwen2ForCausalLM:
    """Two small layers with Qwen's 151,936-token vocabulary, embeddings scaled by 4 so that the logits spread
    (std about 1, entropy about 4 nats at temperature 0.7 instead of log V = 11.9)."""
    config = Qwen2Config(vocab_size=151936, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=256, tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4)
    return model


def naive_logprobs(model, rollout: R.Rollout, temperature: float):
    """The obviously correct float32 way: (N, L, V) logits of every position, log_softmax, gather."""
    ids, attn, comp = rollout.input_ids, rollout.attention_mask, rollout.completion_mask
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn)).logits
    T = comp.shape[1]
    logp = F.log_softmax(logits[:, -T - 1:-1].float() / temperature, dim=-1)               # (N, T, V)
    token_logp = logp.gather(-1, ids[:, -T:, None]).squeeze(-1)                            # (N, T)
    entropy = -(logp.exp() * logp).sum(-1)
    return token_logp * comp, entropy * comp


def logprobs_and_grads(model, rollout, temperature, fn, autocast):
    """log-probs, entropies and the weight gradients of a loss that uses both (a different weight per column)."""
    weights = torch.linspace(-1, 1, rollout.completion_mask.shape[1], device=rollout.input_ids.device)
    with autocast():
        logp, entropy = fn(rollout, temperature)
    loss = (logp * weights).sum() - 0.01 * entropy.sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return logp.detach(), entropy.detach(), grads


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def check_chunk_logprobs(device: str) -> dict:
    """Returns the worst errors seen, for the record."""
    model = qwen_vocab_model(device)
    rollout = fixed_rollout(model.config.vocab_size, device)
    policy = CompletionLogprobs(model, chunk_size=7)                       # several chunks, one of them partial
    ours = lambda r, tau: policy(r.input_ids, r.attention_mask, r.completion_mask, tau)    # noqa: E731
    naive = lambda r, tau: naive_logprobs(model, r, tau)                                      # noqa: E731
    off = lambda: torch.autocast(device, enabled=False)                                       # noqa: E731
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False                       # float32 means float32 here
    try:
        reference = logprobs_and_grads(model, rollout, 0.7, naive, off)
        exact = logprobs_and_grads(model, rollout, 0.7, ours, off)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # Float32 on both sides: equal up to summation order. The entropy, logz - E_p[z], cancels when it is small
    # next to logz: on CPU it was 2.5e-4 nats off a float64 reference where the naive -sum p log p was 1.7e-5.
    torch.testing.assert_close(exact[0], reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(exact[1], reference[1], rtol=0, atol=1e-3)
    assert max(relative_error(g, r) for g, r in zip(exact[2], reference[2])) < 1e-4     # CPU: 3e-5 at most
    # bf16 autocast (train.py on a GPU) against the float32 reference. bf16 keeps 8 significant bits (a relative
    # rounding step of 2^-8 = 0.4%), so errors of a few such steps are expected; a wrong term would be O(1).
    # The same check under CPU bf16 autocast measured 0.27%, 0.085 nats and 1.6%: the bounds leave 3x room.
    logp, entropy, grads = logprobs_and_grads(model, rollout, 0.7, ours, bf16_autocast(device))
    mask = rollout.completion_mask
    errors = dict(logp=((logp - reference[0]).abs() / reference[0].abs())[mask].max().item(),
                  entropy=(entropy - reference[1]).abs().max().item(),
                  grad=max(relative_error(g, r) for g, r in zip(grads, reference[2])))
    assert errors["logp"] < 0.01, errors                   # relative, per token (log-probs of -12 to -19)
    assert errors["entropy"] < 0.25, errors                # nats, per token (entropies of about 4)
    assert errors["grad"] < 0.05, errors                   # relative, in norm, for every weight tensor
    assert (logp[~mask] == 0).all() and (entropy[~mask] == 0).all()
    return errors


def test_chunk_logprobs_bf16_autocast_against_float32_autograd():
    """Tolerances: in float32, log-probs rtol 1e-4 / atol 1e-5, entropies atol 1e-3 nats, every weight tensor's
    gradient within 1e-4 of the reference in norm; under bf16 autocast, each log-prob within 1% of float32's, each
    entropy within 0.25 nats, each weight tensor's gradient within 5% of float32's in norm."""
    check_chunk_logprobs("cuda")


# ---------------------------------------------------------------- one DDP rank over NCCL

def check_ddp_one_rank(model_dir, device: str, backend: str, store) -> None:
    """One update through DistributedDataParallel (world size 1) and one without, from the same weights: DDP's
    all-reduce of one rank's gradients, the token count's all-reduce and no_sync over micro-batches must leave the
    update unchanged. SGD(lr=1) moves the weights by exactly -grad. Attention runs on the math kernel, whose
    backward is deterministic (the fused kernels' backward may add in any order)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = replace(train.Config(), steps_per_generation=1, micro_batch_size=3, beta=0.0, entropy_coef=0.01)
    results = []
    for wrapped in (False, True):
        if wrapped:
            torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        try:
            model = load_model(str(model_dir), device=device).train()
            policy = dist.wrap(CompletionLogprobs(model), fsdp=False)
            assert isinstance(policy, torch.nn.parallel.DistributedDataParallel) == wrapped
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            rollout = fixed_rollout(model.config.vocab_size, device)
            advantages = torch.linspace(-1, 1, len(rollout.input_ids), device=device)
            with sdpa_kernel(SDPBackend.MATH):
                stats = update.policy_update(policy, optimizer, rollout, advantages, None, None, cfg,
                                            bf16_autocast(device))
            results.append(({n: p.detach().clone() for n, p in model.named_parameters()}, stats))
        finally:
            if wrapped:
                torch.distributed.destroy_process_group()
    (plain, plain_stats), (ddp, ddp_stats) = results
    for name in plain:
        # the gradient's norm is clipped to 1, spread over 0.3M weights: 1e-5 is a small part of one element's step
        torch.testing.assert_close(ddp[name], plain[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert ddp_stats["grad_norm"] == pytest.approx(plain_stats["grad_norm"], rel=1e-5)


def test_ddp_one_rank_nccl(tiny_model_dir, tmp_path, monkeypatch):
    """DDP over NCCL with one rank (a file:// rendezvous, no torchrun): the same update as without DDP."""
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")               # a one-process group needs no network interface
    check_ddp_one_rank(tiny_model_dir, "cuda", "nccl", tmp_path / "rendezvous")


# ---------------------------------------------------------------- compiled generation

def check_compiled_generation(model_dir, device: str) -> None:
    from torch._dynamo.utils import counters
    model, tok = load_model(str(model_dir), device=device), load_tokenizer(str(model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(30)                                # sharp logits: greedy completions vary and end at different steps
    texts = ["hi", "what is the weather in Paris today please", "book a table for two", "a",
             "send an email to bob about the meeting tomorrow at noon"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    kwargs = dict(num_generations=2, max_new_tokens=12, temperature=0.0, eos_ids=[222, 1252, 833, 1200],
                  pad_id=R.pad_token_id(tok), batch_size=4)
    torch._dynamo.reset()
    graphs = None
    for batch in (prompts[1:3], prompts[3:5]):        # longest prompt 11, then 18 tokens: a 32-token cache both times
        eager = R.generate_rollout(model.eval(), batch, **kwargs)
        compiled = R.generate_rollout(model, batch, compile=True, **kwargs)
        width = max(eager.completion_mask.shape[1], compiled.completion_mask.shape[1])
        pad = lambda x: F.pad(x, (0, width - x.shape[1]))                                     # noqa: E731
        assert torch.equal(pad(eager.completion_mask), pad(compiled.completion_mask))
        assert torch.equal(pad(eager.completion_ids) * pad(eager.completion_mask),
                           pad(compiled.completion_ids) * pad(compiled.completion_mask))
        graphs = graphs if graphs is not None else counters["stats"]["unique_graphs"]
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs, "the second rollout compiled again"


def test_compiled_generation_equals_eager(tiny_model_dir):
    """--compile_generation on CUDA (static cache, CUDA graphs), float32: the same greedy tokens and masks as the
    eager rollout, and no second compile for another prompt length in the same cache bucket."""
    check_compiled_generation(tiny_model_dir, "cuda")
