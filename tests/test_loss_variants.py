"""The GRPO family's variants in grpo/loss.py (loss_type, importance_sampling_level, mask_truncated_completions,
top_entropy_quantile) against a naive per-token loop, hand arithmetic, today's loss bit for bit, and TRL 1.16's own
GRPOTrainer._compute_loss on the same tensors. No model needed.

Notation: N = sequences in the optimizer step, T = completion tokens, L = max completion length (max_new_tokens).
"""
import math
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from grpo.loss import (LOSS_NORMALISERS, StepCounts, aggregate_loss, grpo_token_loss, high_entropy_mask,
                       loss_mask, masked_sum, token_weights)

EPS_LOW, EPS_HIGH = 0.2, 0.28


def todays_token_loss(logp, old_logp, advantages, eps_low, eps_high, ref_logp=None, beta=0.0, entropy=None,
                      entropy_coef=0.0):
    """grpo_token_loss as it was before the variants (frozen copy): the default path must still give exactly this."""
    A = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    surr1 = ratio * A
    surr2 = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A
    loss = -torch.min(surr1, surr2)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy
    return loss, {"kl": kl.detach(), "clipped": (surr2 < surr1).float()}


def random_batch(seed, N=6, T=7, dtype=torch.float64, truncated_rows=(2,)):
    """Ragged completions (one empty row, one full-length), off-policy old logps, a reference, entropies."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 7, 7, 1, 0, 5][:N])
    mask = torch.arange(T)[None, :] < lengths[:, None]                                     # (N, T)
    truncated = torch.zeros(N, dtype=torch.bool)
    truncated[list(truncated_rows)] = True                                                 # no EOS: full length
    logp = torch.where(mask, -torch.rand(N, T, generator=g, dtype=dtype) * 3, 0.0)         # 0 at padding, as ours
    old = logp + torch.randn(N, T, generator=g, dtype=dtype) * 0.3                         # ratios ~ 0.5 .. 2
    ref = logp + torch.randn(N, T, generator=g, dtype=dtype) * 0.3
    entropy = torch.rand(N, T, generator=g, dtype=dtype) * 2
    advantages = torch.randn(N, generator=g, dtype=dtype)
    return SimpleNamespace(logp=logp, old=old, ref=ref, entropy=entropy, advantages=advantages, mask=mask,
                           truncated=truncated, N=N, T=T, L=T + 1)


def ours(b, loss_type="dapo", level="token", mask_truncated=False, q=1.0, split=None, beta=0.0, entropy_coef=0.0,
         eps=(EPS_LOW, EPS_HIGH)):
    """The step's loss and gradients as policy_update would compute them with these functions: one backward per
    micro-batch (`split`: their sizes), the step's counts fixed before the first. Returns loss, d/dlogp, d/dentropy."""
    logp, entropy = b.logp.clone().requires_grad_(), b.entropy.clone().requires_grad_()
    split = split or [b.N]
    keep = loss_mask(b.mask, b.truncated, mask_truncated)                                  # (N, T)
    step = StepCounts(keep.sum().clamp(min=1), b.N, len(split), b.L)
    total = 0.0
    for rows in torch.arange(b.N).split(split):
        mask = keep[rows]
        policy_mask = high_entropy_mask(entropy[rows], mask, q)
        token_loss, _ = grpo_token_loss(logp[rows], b.old[rows], b.advantages[rows], *eps, b.ref[rows], beta,
                                        entropy[rows], entropy_coef, mask, level, policy_mask)
        loss = aggregate_loss(token_loss, mask, loss_type, step)
        loss.backward()
        total += loss.item()
    return total, logp.grad, entropy.grad


def naive(b, loss_type="dapo", level="token", mask_truncated=False, q=1.0, split=None, beta=0.0, entropy_coef=0.0,
          eps=(EPS_LOW, EPS_HIGH)):
    """The same loss written token by token from the papers' equations, with Python control flow; autograd on
    scalars gives its gradient."""
    logp, entropy = b.logp.clone().requires_grad_(), b.entropy.clone().requires_grad_()
    split = split or [b.N]
    real = [[bool(b.mask[i, t]) and not (mask_truncated and bool(b.truncated[i])) for t in range(b.T)]
            for i in range(b.N)]
    step_tokens = max(sum(map(sum, real)), 1)
    S, M = b.N, len(split)
    loss, start = 0.0, 0
    for size in split:
        rows = range(start, start + size)
        start += size
        # the quantile is taken in float32, as TRL's (and ours): round the values first
        values = sorted(float(entropy[i, t].detach().float()) for i in rows for t in range(b.T) if real[i][t])
        if q < 1 and values:                                 # linear-interpolated (1 - q)-quantile, by hand
            pos = (1 - q) * (len(values) - 1)
            lo = math.floor(pos)
            threshold = values[lo] + (pos - lo) * (values[min(lo + 1, len(values) - 1)] - values[lo])
        else:
            threshold = -math.inf
        mb_tokens = max(sum(sum(real[i]) for i in rows), 1)
        mb_loss = 0.0
        for i in rows:
            n_i = sum(real[i])
            A = b.advantages[i]
            seq_log_ratio = sum(logp[i, t] - b.old[i, t] for t in range(b.T) if real[i][t]) / max(n_i, 1)
            seq_loss = 0.0
            for t in range(b.T):
                if not real[i][t]:
                    continue
                ratio = torch.exp(logp[i, t] - b.old[i, t] if level == "token" else seq_log_ratio)
                surr1, surr2 = ratio * A, torch.clamp(ratio, 1 - eps[0], 1 + eps[1]) * A
                carries = float(entropy[i, t].detach()) >= threshold   # a high-entropy token: policy term and bonus
                d = b.ref[i, t] - logp[i, t]
                l_it = (-torch.min(surr1, surr2) - entropy_coef * entropy[i, t]) * carries \
                    + beta * (torch.exp(d) - d - 1)           # the KL is on every token
                seq_loss = seq_loss + l_it
            if loss_type == "grpo":                           # mean over the sequence's tokens, mean over sequences
                mb_loss = mb_loss + seq_loss / max(n_i, 1) / S
            elif loss_type == "dapo":                         # sum over the step's tokens / their count
                mb_loss = mb_loss + seq_loss / step_tokens
            elif loss_type == "dr_grpo":                      # sum / (sequences * max completion length)
                mb_loss = mb_loss + seq_loss / (S * b.L)
            else:                                             # bnpo: token mean per micro-batch, mean over them
                mb_loss = mb_loss + seq_loss / mb_tokens / M
        loss = loss + mb_loss
    loss.backward()
    return loss.item(), logp.grad, entropy.grad


def assert_same(a, b, tol=1e-12):
    assert abs(a[0] - b[0]) <= tol * max(1.0, abs(b[0])), (a[0], b[0])
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


# ---- the default path is today's, bit for bit --------------------------------------------------------------------

@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("beta, entropy_coef", [(0.0, 0.0), (0.04, 0.001)])
def test_defaults_give_todays_loss_and_gradients_bit_for_bit(on_policy, beta, entropy_coef):
    b = random_batch(0, dtype=torch.float32)
    results = []
    for new in (False, True):
        logp, entropy = b.logp.clone().requires_grad_(), b.entropy.clone().requires_grad_()
        old = logp.detach() if on_policy else b.old
        n_tokens = b.mask.sum().clamp(min=1)
        step = StepCounts(n_tokens, b.N, 2, b.L)
        losses = []
        for rows in torch.arange(b.N).split(4):                            # two micro-batches, as policy_update
            if new:                                                        # every new call at its default
                mask = loss_mask(b.mask, b.truncated, False)[rows]
                token_loss, parts = grpo_token_loss(logp[rows], old[rows], b.advantages[rows], EPS_LOW, EPS_HIGH,
                                                    b.ref[rows], beta, entropy[rows], entropy_coef, mask, "token",
                                                    high_entropy_mask(entropy[rows], mask, 1.0))
                loss = aggregate_loss(token_loss, mask, "dapo", step)
            else:                                                          # train.py's code before the variants
                mask = b.mask[rows]
                token_loss, parts = todays_token_loss(logp[rows], old[rows], b.advantages[rows], EPS_LOW,
                                                      EPS_HIGH, b.ref[rows], beta, entropy[rows], entropy_coef)
                loss = masked_sum(token_loss, mask) / n_tokens
            loss.backward()
            losses += [loss.detach(), masked_sum(parts["kl"], mask), masked_sum(parts["clipped"], mask)]
        results.append((losses, logp.grad, entropy.grad))
    (old_losses, old_grad, old_egrad), (new_losses, new_grad, new_egrad) = results
    assert all(torch.equal(x, y) for x, y in zip(old_losses, new_losses))
    assert torch.equal(old_grad, new_grad)
    assert (old_egrad is None and new_egrad is None) or torch.equal(old_egrad, new_egrad)


# ---- every variant against the naive loop -------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", sorted(LOSS_NORMALISERS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mask_truncated, q", [(False, 1.0), (True, 1.0), (False, 0.3), (True, 0.5)])
def test_variant_matches_naive_loop(loss_type, level, mask_truncated, q):
    b = random_batch(1)
    kwargs = dict(loss_type=loss_type, level=level, mask_truncated=mask_truncated, q=q, split=[2, 2, 2],
                  beta=0.05, entropy_coef=0.01)
    assert_same(ours(b, **kwargs), naive(b, **kwargs))


def test_token_weights_by_hand():
    # Two answers, 1 and 3 tokens; one micro-batch; S = 2 sequences, L = 4, 4 tokens.
    mask = torch.tensor([[True, False, False], [True, True, True]])
    step = StepCounts(torch.tensor(4), 2, 1, 4)
    w = {k: token_weights(mask, k, step) for k in LOSS_NORMALISERS}
    torch.testing.assert_close(w["dapo"], mask / 4.0)                                  # 1 / tokens
    torch.testing.assert_close(w["grpo"], torch.tensor([[1 / 2, 0, 0], [1 / 6] * 3]))  # 1 / (len_i * S)
    torch.testing.assert_close(w["dr_grpo"], mask / 8.0)                               # 1 / (S * L)
    torch.testing.assert_close(w["bnpo"], mask / 4.0)                                  # 1 / (mb tokens * M)
    # On-policy (ratio 1), beta 0: l_it = -A_i. A = (+1 for the short answer, -1 for the long one):
    # dapo = (-1 + 3) / 4 = 0.5; grpo = (-1/1 + 3/3) / 2 = 0: the long wrong answer's 3 tokens cancel the short
    # right one's 1 (Dr. GRPO's length bias); dr_grpo = (-1 + 3) / 8 = 0.25; bnpo = dapo with one micro-batch.
    token_loss = torch.tensor([[-1.0, 9.0, 9.0], [1.0, 1.0, 1.0]], dtype=torch.float64)  # 9: padding, ignored
    expected = {"dapo": 0.5, "grpo": 0.0, "dr_grpo": 0.25, "bnpo": 0.5}
    for loss_type, value in expected.items():
        assert aggregate_loss(token_loss, mask, loss_type, step).item() == pytest.approx(value, abs=1e-15)
        # the weights are the loss's gradient with respect to each token's loss
        x = token_loss.clone().requires_grad_()
        aggregate_loss(x, mask, loss_type, step).backward()
        torch.testing.assert_close(x.grad.float(), w[loss_type])       # token_weights: float32


# ---- micro-batch split invariance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_split_invariant_losses_give_the_same_step(loss_type):
    b = random_batch(2)
    whole = ours(b, loss_type, split=[6], beta=0.05, entropy_coef=0.01)
    for split in ([2, 2, 2], [4, 1, 1], [1] * 6):
        assert_same(ours(b, loss_type, split=split, beta=0.05, entropy_coef=0.01), whole)


def test_bnpo_is_not_split_invariant():
    # bnpo divides each micro-batch by its own tokens: micro-batches of unequal token counts weigh their tokens
    # unequally, so the step's gradient depends on the split (TRL's docs: "results may slightly vary").
    b = random_batch(2)
    whole, split = ours(b, "bnpo", split=[6]), ours(b, "bnpo", split=[4, 1, 1])
    assert not torch.allclose(whole[1], split[1], rtol=1e-3, atol=1e-6)
    assert_same(whole, ours(b, "dapo", split=[6]))             # one micro-batch: bnpo is dapo


# ---- GSPO's sequence ratio ----------------------------------------------------------------------------------------

def test_sequence_ratio_by_hand_and_padding_nan_stays_out():
    # log-ratios 0.1 and 0.3 on the real tokens: s = exp(mean) = exp(0.2) = 1.2214 < 1 + 0.28, A = 1, unclipped:
    # each token's loss is -s; d(-s)/dlogp_t = -s / 2 on each real token; the NaN at padding changes nothing.
    logp = torch.tensor([[0.1, 0.3, float("nan")]], dtype=torch.float64, requires_grad=True)
    old, A = torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    token_loss, parts = grpo_token_loss(logp, old, A, EPS_LOW, EPS_HIGH, mask=mask,
                                        importance_sampling_level="sequence")
    s = math.exp(0.2)
    assert token_loss[0, :2].tolist() == pytest.approx([-s, -s], abs=1e-15)
    masked_sum(token_loss, mask).backward()                    # sum over 2 tokens: -2 s; gradient -s per token
    assert logp.grad[0].tolist() == pytest.approx([-s, -s, 0.0], abs=1e-15)
    assert parts["clipped"].tolist() == [[0.0, 0.0, 0.0]]
    # A = 1 and mean log-ratio 0.5: s = 1.65 > 1.28, clipped on every token of the sequence, no gradient
    logp = torch.tensor([[0.4, 0.6, 0.0]], dtype=torch.float64, requires_grad=True)
    token_loss, parts = grpo_token_loss(logp, old, A, EPS_LOW, EPS_HIGH, mask=mask,
                                        importance_sampling_level="sequence")
    masked_sum(token_loss, mask).backward()
    assert logp.grad.abs().max().item() == 0.0 and parts["clipped"].tolist() == [[1.0, 1.0, 1.0]]


def test_sequence_ratio_on_policy_equals_token_ratio_with_grpo_aggregation():
    # On-policy every ratio is 1: GSPO's gradient -A/len_i * sum_t w_it equals GRPO's -A w_it when every token of a
    # sequence weighs the same, len_i of them (loss_type grpo). (TRL's docs: GSPO changes nothing on-policy.)
    b = random_batch(3)
    b.old = b.logp.clone()
    assert_same(ours(b, "grpo", "sequence"), ours(b, "grpo", "token"))


# ---- truncated completions and the entropy mask -------------------------------------------------------------------

def test_loss_mask_drops_truncated_rows_only_when_asked():
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    truncated = torch.tensor([True, False, False])
    assert torch.equal(loss_mask(mask, truncated, False), mask)
    assert loss_mask(mask, truncated, True).tolist() == [[False, False], [True, False], [True, True]]


def test_truncated_rows_leave_token_counts_but_not_sequence_counts():
    # Row 2 is truncated (7 tokens). dapo divides by the remaining tokens; grpo still divides by all 6 sequences.
    b = random_batch(4)
    b.old = b.logp.clone()                                   # on-policy: d loss / d logp_it = -A_i * weight_it
    _, grad_dapo, _ = ours(b, "dapo", mask_truncated=True)
    _, grad_grpo, _ = ours(b, "grpo", mask_truncated=True)
    remaining = int(b.mask.sum()) - 7
    assert grad_dapo[2].abs().max().item() == 0.0 and grad_grpo[2].abs().max().item() == 0.0
    torch.testing.assert_close(grad_dapo[0, 0], -b.advantages[0] / remaining)
    torch.testing.assert_close(grad_grpo[0, 0], -b.advantages[0] / (3 * 6))            # len_0 = 3, S = 6


def test_high_entropy_mask_by_hand():
    # 10 real tokens with entropies 0.1 .. 1.0, and padding with entropy 5 that must not count.
    # q = 0.2: threshold = quantile at 0.8 = position 0.8 * 9 = 7.2 -> 0.8 + 0.2 * (0.9 - 0.8) = 0.82: 2 tokens.
    entropy = torch.cat([torch.arange(1, 11) / 10, torch.tensor([5.0, 5.0])]).view(2, 6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert high_entropy_mask(entropy, mask, 0.2).flatten().nonzero().flatten().tolist() == [8, 9]
    assert high_entropy_mask(entropy, mask, 1.0) is mask                       # every real token, no quantile
    assert high_entropy_mask(entropy, mask, 0.0).flatten().nonzero().flatten().tolist() == [9]  # the maximum
    empty = torch.zeros_like(mask)
    assert not high_entropy_mask(entropy, empty, 0.2).any()


def test_entropy_mask_leaves_the_kl_on_every_token():
    # A = 0 and no entropy bonus: only the KL term is left, and the entropy mask must not change it.
    b = random_batch(5)
    b.advantages = torch.zeros_like(b.advantages)
    assert_same(ours(b, q=0.2, beta=0.1), ours(b, q=1.0, beta=0.1))
    assert ours(b, q=0.2, beta=0.1)[1].abs().max() > 0


# ---- TRL 1.16's own loss on the same tensors ----------------------------------------------------------------------

def trl_step(b, loss_type, level, mask_truncated, q, split, beta):
    """Sum over micro-batches of TRL's GRPOTrainer._compute_loss (each backpropagated), run on a stand-in for the
    trainer that returns our tensors as the model's log-probs and entropies. TRL masks truncated completions
    (completion_mask * ~truncated) before its loss; that one line is repeated here."""
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer
    logp, entropy = b.logp.clone().requires_grad_(), b.entropy.clone()
    completion_mask = b.mask.int()
    if mask_truncated:
        completion_mask = completion_mask * (~b.truncated).unsqueeze(1).int()
    identity = lambda x, **kwargs: x                                               # noqa: E731 one process
    accelerator = SimpleNamespace(num_processes=1, gather=identity, reduce=identity, gather_for_metrics=identity,
                                  pad_across_processes=identity)
    trainer = SimpleNamespace(
        loss_type=loss_type, importance_sampling_level=level, top_entropy_quantile=q, beta=beta,
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=b.L, accelerator=accelerator,
        current_gradient_accumulation_steps=len(split), aux_loss_enabled=False, off_policy_mask_threshold=None,
        use_vllm=False, _entropy_bonus_enabled=False, model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=len(split)),
        _metrics=defaultdict(lambda: defaultdict(list)))
    trainer.get_high_entropy_mask = partial(GRPOTrainer.get_high_entropy_mask, trainer)
    total = 0.0
    for rows in torch.arange(b.N).split(split):
        trainer._get_per_token_logps_and_entropies = lambda *args, rows=rows, **kwargs: (logp[rows], entropy[rows],
                                                                                          None)
        n = len(rows)
        inputs = {"prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
                  "completion_ids": torch.zeros(n, b.T, dtype=torch.long), "completion_mask": completion_mask[rows],
                  "advantages": b.advantages[rows], "old_per_token_logps": b.old[rows],
                  "ref_per_token_logps": b.ref[rows], "num_items_in_batch": completion_mask.sum()}
        loss = GRPOTrainer._compute_loss(trainer, None, inputs)
        loss.backward()
        total += loss.item()
    return total, logp.grad


@pytest.mark.parametrize("loss_type", sorted(LOSS_NORMALISERS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mask_truncated, q", [(False, 1.0), (True, 0.3)])
def test_matches_trl(loss_type, level, mask_truncated, q):
    # TRL averages grpo/dr_grpo per micro-batch: equal to ours when the micro-batches are equal in size, as here.
    b = random_batch(6)
    got = ours(b, loss_type, level, mask_truncated, q, split=[2, 2, 2], beta=0.05)
    want = trl_step(b, loss_type, level, mask_truncated, q, split=[2, 2, 2], beta=0.05)
    assert_same(got[:2], want, tol=1e-12)


def test_high_entropy_mask_matches_trl():
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer
    b = random_batch(7, dtype=torch.float32)
    identity = lambda x, **kwargs: x                                               # noqa: E731 one process
    trainer = SimpleNamespace(accelerator=SimpleNamespace(gather=identity, pad_across_processes=identity))
    for q in (0.0, 0.1, 0.2, 0.5, 0.9):
        want = GRPOTrainer.get_high_entropy_mask(trainer, b.entropy, b.mask.int(), 1 - q)
        assert torch.equal(high_entropy_mask(b.entropy, b.mask, q), want), q
