"""Tests for losses.py against the recomputed TRL / verl vectors of REFERENCES.md sections
3.1-3.3."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from losses import (aggregate, clip_fraction, full_vocab_kl, group_advantages, k3_kl,
                    policy_gradient_loss, transfer_loss)

D = torch.float64


def as_t(x):
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        x = torch.stack(list(x))
    return x.detach().to(D) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=D)


def close(a, b, tol=1e-6):
    torch.testing.assert_close(as_t(a), as_t(b), atol=tol, rtol=0)


# ---- 3.1 advantages ---------------------------------------------------------------------------

ADV_VECTORS = [  # rewards, TRL (Bessel std + 1e-4), r - mean
    ([1, 0, 0, 1], [0.865875, -0.865875, -0.865875, 0.865875], [0.5, -0.5, -0.5, 0.5]),
    ([1, 0, 0, 0, 0, 0, 0, 0], [2.474174] + [-0.353453] * 7, [0.875] + [-0.125] * 7),
    ([0.1, 1.1, 0.0, 1.0], [-0.775421, 0.947737, -0.947737, 0.775421], [-0.45, 0.55, -0.55, 0.45]),
    ([1, 1, 1, 0, 0, 0], [0.912704] * 3 + [-0.912704] * 3, [0.5] * 3 + [-0.5] * 3),
    ([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]),
]


@pytest.mark.parametrize("rewards,trl,centred", ADV_VECTORS)
def test_advantages_match_reference_vectors(rewards, trl, centred):
    r = torch.tensor(rewards, dtype=D)
    close(group_advantages(r, "grpo"), trl)
    close(group_advantages(r, "dr_grpo"), centred)
    close(group_advantages(r, "meml"), [max(c, 0.0) for c in centred])


def test_meml_zeroes_exactly_the_below_mean_responses():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])  # mean 0.4
    a = group_advantages(r, "meml")
    assert torch.equal(a > 0, r > r.mean())
    assert torch.all(a[r <= r.mean()] == 0)


def test_advantages_batched_over_groups_equal_one_group_at_a_time():
    # (Q=2, N=2, G=4)
    r = torch.tensor([[[1., 0, 0, 1], [1, 0, 0, 0]], [[0, 0, 0, 0], [1, 1, 0, 1]]])
    for mode in ("meml", "grpo", "dr_grpo"):
        batched = group_advantages(r, mode)
        for q in range(2):
            for e in range(2):
                close(batched[q, e], group_advantages(r[q, e], mode))


def test_single_sample_group_gives_zero_not_nan():
    assert torch.equal(group_advantages(torch.tensor([1.0]), "grpo"), torch.tensor([0.0]))


def test_unknown_advantage_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="meml"):
        group_advantages(torch.zeros(4), "ppo")


# ---- 3.2 per-token loss and aggregation ---------------------------------------------------------

LOGP = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, 0.0]]
OLD = [[-1.1, -0.5, -1.0, -0.3], [-0.2, -1.0, -2.5, 0.0]]
REF = [[-1.2, -0.4, -2.2, -0.2], [-0.3, -1.5, -0.6, 0.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]
ADV = [0.8, -1.1]


def vectors32():
    return (torch.tensor(LOGP, dtype=D, requires_grad=True), torch.tensor(OLD, dtype=D),
            torch.tensor(REF, dtype=D), torch.tensor(MASK, dtype=D), torch.tensor(ADV, dtype=D))


def test_clipped_surrogate_matches_trl_per_token_values():
    logp, old, _, mask, adv = vectors32()
    pg = policy_gradient_loss(logp, adv, old, 0.2, 0.2)
    expected = [[-0.884137, -0.8, -0.294304, -0.96], [0.995321, 0.900604, 6.654612, 0.0]]
    close(pg * mask, expected)
    close(clip_fraction(logp, old, adv, mask, 0.2), 1 / 7)


def test_k3_value_and_gradient_match_reference():
    logp, _, ref, mask, _ = vectors32()
    kl = k3_kl(logp, ref)
    close(kl * mask, [[0.018731, 0.005171, 0.018731, 0.004837], [0.0, 0.040818, 0.005171, 0.0]])
    (kl * mask).sum().backward()
    close(logp.grad, [[0.181269, -0.105171, 0.181269, 0.095163], [0.0, 0.259182, -0.105171, 0.0]])


@pytest.mark.parametrize("beta,grpo,bnpo,dr_grpo", [(0.04, 1.058328, 0.802262, 0.701979),
                                                    (0.0, 1.057784, 0.801728, 0.701512)])
def test_aggregations_reproduce_trl_loss_types(beta, grpo, bnpo, dr_grpo):
    logp, old, ref, mask, adv = vectors32()
    per_token = policy_gradient_loss(logp, adv, old, 0.2) + beta * k3_kl(logp, ref)
    close(aggregate(per_token, mask, "seq"), grpo)  # TRL "grpo"
    close(aggregate(per_token, mask, "token"), bnpo)  # TRL "bnpo" == "dapo" with one process, GA 1
    close(aggregate(per_token, mask, "token", n_tokens=7), bnpo)  # explicit global count
    close(aggregate(per_token, mask, "dr_grpo", n_seqs=2, max_len=4), dr_grpo)


def test_on_policy_value_and_gradient():
    logp, _, _, mask, adv = vectors32()
    per_token = policy_gradient_loss(logp, adv)  # old = logp.detach(): ratio == 1
    close(aggregate(per_token, mask, "seq"), 0.15)
    loss = aggregate(per_token, mask, "token")
    close(loss, 0.014286)
    loss.backward()
    close(logp.grad, torch.tensor([[-0.114286] * 4, [0.157143] * 3 + [0.0]], dtype=D))


# ---- 3.3 micro-batch invariance ---------------------------------------------------------------

def ragged(lengths, values):
    T = max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=D)
    logp = torch.tensor([[v] * T for v in values], dtype=D, requires_grad=True)
    return logp, mask


def test_micro_batches_with_global_count_add_up_to_full_batch():
    a = group_advantages(torch.tensor([1.0, 0, 0, 1], dtype=D), "grpo")
    lengths = [2, 6, 3, 9]
    logp, mask = ragged(lengths, [-1.0, -2.0, -0.5, -0.3])
    full = aggregate(policy_gradient_loss(logp, a), mask, "token")
    close(full, -0.086588)
    full.backward()
    full_grad = logp.grad.clone()
    close(full_grad[:, 0], [-0.043294, 0.043294, 0.043294, -0.043294])

    logp.grad = None
    parts = [aggregate(policy_gradient_loss(logp[i], a[i]), mask[i], "token", n_tokens=20)
             for i in (slice(0, 2), slice(2, 4))]
    close(parts, [0.173175, -0.259763])
    sum(parts).backward()
    close(logp.grad, full_grad)

    # the bug this guards against: each micro-batch divided by its own token count
    wrong = sum(aggregate(policy_gradient_loss(logp[i], a[i]), mask[i], "token") / 2
                for i in (slice(0, 2), slice(2, 4)))
    close(wrong, 0.0)


def test_dr_grpo_and_seq_aggregation_reference_values():
    a = group_advantages(torch.tensor([1.0, 0, 0, 1], dtype=D), "grpo")
    logp, mask = ragged([2, 6, 3, 9], [0.0] * 4)
    close(aggregate(policy_gradient_loss(logp, a), mask, "dr_grpo", n_seqs=4, max_len=9), -0.048104)
    seq = aggregate(policy_gradient_loss(logp, a), mask, "seq")
    close(seq, 0.0)
    seq.backward()
    close(logp.grad[:, 0], [-0.108234, 0.036078, 0.072156, -0.024052])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=2, max_size=8), st.integers(1, 4),
       st.sampled_from(["token", "seq", "dr_grpo"]))
def test_any_micro_batch_split_gives_full_batch_loss_and_gradient(lengths, mb, mode):
    g = torch.Generator().manual_seed(len(lengths) * 31 + mb)
    B = len(lengths)
    logp, mask = ragged(lengths, [0.0] * B)
    with torch.no_grad():
        logp += torch.randn(logp.shape, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    counts = dict(n_tokens=mask.sum(), n_seqs=B, max_len=max(lengths))
    full = aggregate(policy_gradient_loss(logp, adv), mask, mode, **counts)
    full.backward()
    full_grad, logp.grad = logp.grad.clone(), None
    total = sum(aggregate(policy_gradient_loss(logp[i:i + mb], adv[i:i + mb]), mask[i:i + mb],
                          mode, **counts)
                for i in range(0, B, mb))
    total.backward()
    close(total, full, 1e-9)
    close(logp.grad, full_grad, 1e-9)


# ---- inter-expert transfer ----------------------------------------------------------------------

def test_transfer_loss_value_and_gradient_only_on_student_side():
    student = torch.tensor([[-2.0, -1.0, -3.0], [-0.5, -4.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -0.2, -1.0], [-0.1, -1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    loss = transfer_loss(student, teacher, mask)
    # hand: (1.5 + 0.8 + 2.0 + 0.4 + 3.0) / 5 tokens
    close(loss, 7.7 / 5)
    loss.backward()
    assert teacher.grad is None or torch.all(teacher.grad == 0)
    close(student.grad, -mask / 5)  # minimising raises logp(O+ | P-) on every O+ token


def test_full_vocab_kl_equals_torch_kl_div():
    g = torch.Generator().manual_seed(0)
    t_logits = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    s_logits = torch.randn(2, 3, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    ours = full_vocab_kl(t_logits, s_logits, mask)
    per_tok = F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), reduction="none",
                       log_target=True).sum(-1)
    close(ours, (per_tok * mask).sum() / 5, 1e-6)
    ours.backward()
    assert t_logits.grad is None or torch.all(t_logits.grad == 0)
    assert s_logits.grad.abs().sum() > 0
    # identical distributions: zero KL
    close(full_vocab_kl(s_logits, s_logits, mask), 0.0, 1e-6)
