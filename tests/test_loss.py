"""The GRPO math (grpo/loss.py) against hand arithmetic and naive loops. No model needed."""
import torch

from grpo.loss import group_advantages, grpo_token_loss, kl_k3, masked_sum, zero_std_fraction


def naive_advantages(rewards, G, scale=True, eps=1e-4):
    out = []
    for b in range(len(rewards) // G):
        group = [float(r) for r in rewards[b * G:(b + 1) * G]]
        mean = sum(group) / G
        std = (sum((r - mean) ** 2 for r in group) / (G - 1)) ** 0.5          # Bessel
        for r in group:
            if max(group) - min(group) < 1e-6:
                out.append(0.0)
            else:
                out.append((r - mean) / (std + eps) if scale else r - mean)
    return torch.tensor(out)


def test_advantages_by_hand():
    # group 1: [1, 3] -> mean 2, Bessel std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    # A = (-1, 1) / (sqrt(2) + 1e-4)
    adv = group_advantages(torch.tensor([1.0, 3.0]), 2)
    expected = torch.tensor([-1.0, 1.0]) / (2 ** 0.5 + 1e-4)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)
    # scale=False (Dr. GRPO): just r - mean
    torch.testing.assert_close(group_advantages(torch.tensor([1.0, 3.0]), 2, scale=False), torch.tensor([-1.0, 1.0]))


def test_advantages_against_loop():
    g = torch.Generator().manual_seed(0)
    for G in (2, 4, 8):
        rewards = torch.randn(G * 16, generator=g) * 2
        rewards[:G] = 1.5                                 # one flat group
        rewards[G:2 * G] = torch.tensor([-3.0, 3.0] * (G // 2))
        for scale in (True, False):
            torch.testing.assert_close(group_advantages(rewards, G, scale), naive_advantages(rewards, G, scale),
                                       rtol=1e-6, atol=1e-6)


def test_zero_variance_groups_are_exactly_zero():
    # 0.1 + 0.2 != 0.3 in float: a "flat" group whose float std is ~1e-17 must not explode.
    rewards = torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.3, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8:].abs().max() > 0.5
    assert abs(zero_std_fraction(rewards, 4) - 2 / 3) < 1e-7


def test_k3_is_nonnegative_and_zero_at_identity():
    g = torch.Generator().manual_seed(1)
    logp, ref = -torch.rand(64, 8, generator=g) * 5, -torch.rand(64, 8, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))
    # d = ref - logp = log 2: k3 = e^d - d - 1 = 2 - log 2 - 1 = 0.3068528...
    assert abs(kl_k3(torch.tensor([0.0]), torch.tensor([2.0]).log()).item() - 0.30685282) < 1e-6


def test_ratio_one_beta_zero_gives_reinforce_gradient():
    # On-policy (old = current.detach()), the clipped surrogate's gradient is -A * grad log pi.
    g = torch.Generator().manual_seed(2)
    logp = (-torch.rand(4, 5, generator=g)).requires_grad_()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    loss, _ = grpo_token_loss(logp, logp.detach(), adv, 0.2, 0.2)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(4, 5), rtol=0, atol=1e-7)


def test_clipping_zeroes_gradient_outside_range_for_the_right_sign():
    old = torch.zeros(4, 1)
    # ratios 1.5 (above 1 + eps) and 0.5 (below 1 - eps), each with A > 0 and A < 0
    logp = torch.tensor([[1.5], [1.5], [0.5], [0.5]]).log().requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, parts = grpo_token_loss(logp, old, adv, 0.2, 0.2)
    loss.sum().backward()
    # A>0, ratio 1.5: clipped, no gradient.  A<0, ratio 1.5: unclipped, grad = -A * ratio = 1.5
    # A>0, ratio 0.5: unclipped, grad = -A * ratio = -0.5.  A<0, ratio 0.5: clipped, no gradient.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [1.5], [-0.5], [0.0]]))
    assert parts["clipped"].squeeze(1).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_asymmetric_clip_high():
    logp = torch.tensor([[1.25]]).log().requires_grad_()
    loss, _ = grpo_token_loss(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    loss.sum().backward()
    assert logp.grad.item() == -1.25        # 1.25 < 1 + 0.28: still inside, gradient flows


def test_kl_and_entropy_terms():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0]])
    entropy = torch.tensor([[0.7, 0.3]])
    loss, parts = grpo_token_loss(logp, logp.detach(), torch.tensor([0.0]), 0.2, 0.2, ref, 0.1, entropy, 0.01)
    # A = 0: loss = 0.1 * k3 - 0.01 * H;  k3 at d=-0.5: e^-0.5 + 0.5 - 1
    k3 = torch.tensor([[torch.tensor(-0.5).exp().item() - 0.5, 0.0]])
    torch.testing.assert_close(parts["kl"], k3)
    torch.testing.assert_close(loss, 0.1 * k3 - 0.01 * entropy)


def test_masked_sum_ignores_nan_at_masked_positions():
    x = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert masked_sum(x, mask).item() == 6.0
