"""The premise meter (premise.py) on hand-made reward tables, and the RIEL options that make the
loss terms mean what their lambdas say (riel.py: term_scale, grad_shares, buffer_flush,
transfer_ties, mask_truncated), each against a reference computed here."""
import copy
import math

import pytest
import torch

import losses as buffer_module  # admission draws from losses.uniform
from plumbing import premise
import riel
import losses as transfer
from losses import CORRECT
from riel import HardExample, HardExampleBuffer
from test_mef import Expert, StandIn
from test_riel_reference import (ALL_WRONG, MIXED, answering_sampler, completions_of,
                                 rendered_prompts, step)
from test_riel import naive_logp
from plumbing.tokenizer import load_tokenizer

THREE = [Expert("a", "A."), Expert("b", "B."), Expert("c", "C.")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def test_rescue_counts_questions_one_expert_fails_and_another_solves():
    r = torch.tensor([[[0, 0], [1, 0], [0, 0]],  # q0: a and c all wrong, b right: a and c rescued
                      [[1, 1], [1, 0], [0, 1]],  # q1: nobody all wrong
                      [[0, 0], [0, 0], [0, 0]],  # q2: all wrong everywhere: nothing to transfer
                      [[1, 0], [0, 0], [1, 1]]], dtype=torch.float32)  # q3: b all wrong, rescued
    m = premise.rescue(r, THREE, correct=CORRECT)
    assert m == {"rescue_rate": 0.5, "rescued/a": 0.25, "rescued/b": 0.25, "rescued/c": 0.25}
    assert premise.rescue(torch.ones(2, 3, 4), THREE, correct=CORRECT)["rescue_rate"] == 0.0


def test_every_riel_step_logs_the_meter(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False)
    m, _ = step(tok, MIXED, cfg, StandIn(dim=16))
    # MIXED: q1 terse all wrong (steps right), q2 steps all wrong (terse right)
    assert m["rescue_rate"] == pytest.approx(2 / 3)
    assert m["rescued/terse"] == pytest.approx(1 / 3) and m["rescued/steps"] == pytest.approx(1 / 3)


# ---- term_scale "step": every term over the step's sampled tokens --------------------------------

def test_step_scale_divides_the_transfer_and_sft_sums_by_the_steps_sampled_tokens(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    entry = HardExample(9, "steps", [259, 65, 66], [67, 68, 258])
    buf = HardExampleBuffer(capacity=1, entries=[entry])
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer_k=8, buffer_size=1, lambda1=0.4,
                          lambda2=0.7, term_scale="step", grad_clip=1e9, advantage="meml")
    model = StandIn(dim=16)
    base = copy.deepcopy(model)
    m, delta = step(tok, MIXED, cfg, model, buffer=buf)
    assert m["flushed"] == 1 and m["transfer_pairs"] == 3
    # the same step with the policy gradient alone: what the two other terms add is delta - that
    solo = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer=False,
                           grad_clip=1e9)
    _, d_pg = step(tok, MIXED, solo, copy.deepcopy(base))
    n_all = sum(len(c) for c in completions_of(tok, MIXED, 4))
    twin = copy.deepcopy(base)
    # this step's transfer pairs (one O+ per question, drawn by the step's generator), from its log
    pairs, _ = transfer.transfer_pairs(torch.tensor(MIXED, dtype=torch.float32),
                                       rendered_prompts(tok), completions_of(tok, MIXED, 4),
                                       torch.Generator().manual_seed(0))
    kl = sum((naive_logp(twin, p, o).detach() - naive_logp(twin, s, o)).sum()
             for p, s, o in pairs) / n_all
    sft = -naive_logp(twin, [259, 65, 66], [67, 68, 258]).sum() / n_all
    (0.4 * kl + 0.7 * sft).backward()
    assert m["loss_transfer"] == pytest.approx(kl.item(), rel=1e-5)
    assert m["loss_sft"] == pytest.approx(sft.item(), rel=1e-5)
    for d, d0, p in zip(delta, d_pg, twin.parameters()):
        torch.testing.assert_close(d - d0, -p.grad, atol=1e-6, rtol=1e-4)


def test_grad_shares_are_each_terms_own_gradient_norm(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    entry = HardExample(9, "steps", [259, 65, 66], [67, 68, 258])
    buf = HardExampleBuffer(capacity=1, entries=[entry])
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer_k=8, buffer_size=1,
                          grad_shares=True, grad_clip=1e9)
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    m, _ = step(tok, MIXED, cfg, model, buffer=buf)
    # the flushed entry alone: lambda2 = 1
    sft = -naive_logp(twin, [259, 65, 66], [67, 68, 258]).sum() / 3
    sft.backward()
    norms = [torch.linalg.vector_norm(p.grad) for p in twin.parameters()]
    hand = torch.linalg.vector_norm(torch.stack(norms))
    assert m["grad_norm/sft"] == pytest.approx(hand.item(), rel=1e-4)
    assert m["grad_norm/grpo"] > 0 and m["grad_norm/transfer"] > 0 and m["grad_norm/mel"] == 0
    shares = [m[f"grad_share/{t}"] for t in ("grpo", "transfer", "sft", "mel")]
    assert sum(shares) == pytest.approx(1.0)
    off, _ = step(tok, MIXED, riel.RIELConfig(group_size=4, max_new_tokens=16), StandIn(dim=16))
    assert not any(k.startswith("grad_share") for k in off)


# ---- the buffer flushes exactly B; ties at random; truncated rows masked -------------------------

def test_exact_flush_takes_the_b_oldest_entries_and_the_rest_wait(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, ALL_WRONG))
    monkeypatch.setattr(buffer_module, "uniform", lambda generator: 0.0)  # all 6 groups admitted
    old = [HardExample(i, "terse", [259, 65], [66, 258]) for i in range(3)]
    for flush, flushed, left in (("all", 9, 0), ("exact", 4, 5)):
        buf = HardExampleBuffer(capacity=4, entries=list(old))
        cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer_k=2, buffer_size=4,
                              buffer_flush=flush)
        m, _ = step(tok, ALL_WRONG, cfg, StandIn(dim=16), buffer=buf)
        assert (m["flushed"], m["buffer_size"]) == (flushed, left)
        if flush == "exact":
            # the 3 old entries and the first new one (q0, terse) went; the other 5 wait, in order
            waiting = [(e.question_id, e.expert) for e in buf.entries]
            assert waiting == [(0, "steps"), (1, "terse"), (1, "steps"), (2, "terse"), (2, "steps")]
    with pytest.raises(ValueError, match="buffer_flush"):
        riel.RIELConfig(buffer_flush="some")


def test_random_ties_pick_each_tied_expert_equally_often():
    r = torch.tensor([[1., 1], [1, 1], [0, 0], [0, 0], [0, 0]])  # E+ tied: 0, 1; E- tied: 2, 3, 4
    assert transfer.choose_transfer(r) == (0, 2)  # the default: the lowest index
    g = torch.Generator().manual_seed(0)
    draws = [transfer.choose_transfer(r, g, random_ties=True) for _ in range(3000)]
    for i in (0, 1):
        assert abs(sum(p == i for p, _ in draws) / 3000 - 1 / 2) < 0.04
    for i in (2, 3, 4):
        assert abs(sum(n == i for _, n in draws) / 3000 - 1 / 3) < 0.04


def test_masked_truncated_rows_get_no_loss_and_leave_the_token_count(tok, monkeypatch):
    fake = answering_sampler(tok, MIXED)

    def truncating(*a, **kw):  # every row of expert "steps" was cut at max_new_tokens
        out = fake(*a, **kw)
        out.finish = ["length" if (r // 4) % 2 else "stop" for r in range(len(out.completions))]
        return out
    monkeypatch.setattr(riel, "generate", truncating)
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer=False,
                          mask_truncated=True, grad_clip=1e9)
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    m, delta = step(tok, MIXED, cfg, model)
    prompts, comps = rendered_prompts(tok), completions_of(tok, MIXED, 4)
    kept = [r for r in range(len(comps)) if (r // 4) % 2 == 0]  # terse's rows
    n_kept = sum(len(comps[r]) for r in kept)
    loss = 0.0
    for r in kept:
        group = MIXED[r // 8][0]
        a = max(group[r % 4] - sum(group) / 4, 0.0)
        loss = loss - a * naive_logp(twin, prompts[r // 4], comps[r]).sum() / n_kept
    loss.backward()
    assert m["trained_rows"] == 3 and m["completions/clipped_ratio"] == 0.5
    for d, p in zip(delta, twin.parameters()):
        torch.testing.assert_close(d, -p.grad, atol=1e-6, rtol=1e-4)


def test_the_probe_reads_the_meter_for_the_best_expert_overall_and_per_shape(tok, monkeypatch):
    # the command; the module above is plumbing/premise.py
    from experiments import premise as probe_script
    r = torch.tensor([[[0, 0], [1, 1], [0, 0]],  # b best overall (mean .5); a and c rescued on q0
                      [[1, 0], [1, 0], [0, 0]],  # c rescued
                      [[0, 0], [0, 0], [0, 0]],
                      [[0, 0], [1, 0], [1, 1]]], dtype=torch.float32)  # a rescued
    s = probe_script.summary(r, THREE)
    assert s["best_expert"] == "b" and s["rescued_best"] == s["rescued/b"] == 0.0
    assert s["all_wrong"] == {"a": 0.75, "b": 0.25, "c": 0.75} and s["rescue_rate"] == 0.75
    assert "| overall (4) | b (best) |" in probe_script.table({"overall": s})


def test_reward_std_is_trls_mean_over_groups_of_the_unbiased_group_std():
    r = torch.tensor([[[0, 0, 1, 1], [1, 1, 1, 1]], [[0, 0, 0, 1], [1, 0, 0, 0]]],
                     dtype=torch.float32)
    # by hand, unbiased (torch.std, as TRL): sum of squared deviations over G - 1
    groups = [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1], [1, 0, 0, 0]]
    by_hand = [math.sqrt(sum((x - sum(g) / 4) ** 2 for x in g) / 3) for g in groups]
    m = premise.step_metrics(r, THREE[:2], [], correct=CORRECT)
    assert m["reward_std"] == pytest.approx(sum(by_hand) / 4)
    assert by_hand[0] == pytest.approx(math.sqrt(1 / 3))
    # G = 1: no spread, not NaN
    assert premise.step_metrics(r[..., :1], THREE[:2], [], correct=CORRECT)["reward_std"] == 0.0
