"""RIEL's terms against references written here, never by calling the code under test: the buffer's
SFT step, which record a row is scored against, the k3 KL to a perturbed reference, and log-probs at
the sampling temperature. Each test makes its term the only one that moves the weights (SGD, lr 1:
delta = -gradient), so a bug in that term alone changes the weights (tests/mutate.py lists the bugs
each one catches)."""
import copy

import pytest
import torch

import losses as buffer_module  # admission draws from losses.uniform
import riel
from rollout import Rollout
from riel import HardExampleBuffer
from test_mef import StandIn
from test_riel import EXPERTS, naive_logp, sgd_delta
from plumbing.tokenizer import load_tokenizer, render_chat
from test_mef import Rec

# answers differ per record, and so do the two experts' traces: a row scored against another
# record, or an entry holding another expert's prompt or trace, changes the numbers
RECORDS = [Rec(0, "3+4?", "7", {"terse": "7", "steps": "3+4=7"}),
           # no terse trace: the buffer falls back to the first one
           Rec(1, "9*9?", "81", {"steps": "9*9=81"}),
           Rec(2, "2+2?", "4", {"terse": "4", "steps": "2+2=4"})]
WRONG = {"7": "8", "81": "18", "4": "5"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def answering_sampler(tok, table):
    """A generate() stand-in: row (q, expert, g) answers record q's own answer when
    table[q][expert][g] is 1, else a wrong number; lengths vary with the row."""
    def fake(model, prompts, *, num_samples, stop_ids, **_):
        comps, N = [], len(table[0])
        for p in range(len(prompts)):
            q = p // N
            for g in range(num_samples):
                ans = RECORDS[q].answer if table[q][p % N][g] else WRONG[RECORDS[q].answer]
                ids = tok.encode("ans " * (g % 3) + ans, add_special_tokens=False)
                comps.append(ids + [stop_ids[0]])
        return Rollout(comps, ["stop"] * len(comps))
    return fake


def own_answer(rec, text):
    """The reward of a checker that reads the record it is given: right iff the text ends in that
    record's answer."""
    return float(text.split()[-1] == rec.answer)


def rendered_prompts(tok):
    return [render_chat(tok, e.system_prompt, r.question) for r in RECORDS for e in EXPERTS]


def step(tok, table, cfg, model, **kw):
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    buf = kw.pop("buffer", HardExampleBuffer(cfg.buffer_size))
    m = riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, buf,
                       torch.Generator().manual_seed(0), own_answer, **kw)
    return m, sgd_delta(model, before)


def completions_of(tok, table, G):
    sample = answering_sampler(tok, table)
    return sample(None, rendered_prompts(tok), num_samples=G, stop_ids=[258]).completions


# ---- which record a row is scored against --------------------------------------------------------

MIXED = [[[1, 1, 0, 0], [1, 0, 0, 0]],  # q0: terse .5, steps .25
         [[0, 0, 0, 0], [1, 1, 1, 0]],  # q1: terse 0, steps .75
         [[1, 0, 0, 0], [0, 0, 0, 0]]]  # q2: terse .25, steps 0


def test_every_row_is_scored_against_its_own_record(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer=False)
    m, _ = step(tok, MIXED, cfg, StandIn(dim=16))
    assert m["reward/terse"] == pytest.approx(3 / 12)
    assert m["reward/steps"] == pytest.approx(4 / 12)
    assert m["all_wrong"] == pytest.approx(2 / 6) and m["zero_signal_questions"] == 0
    # E+ / E- per question: q0 terse->steps, q1 steps->terse, q2 terse->steps
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False)
    m, _ = step(tok, MIXED, cfg, StandIn(dim=16))
    counts = (m["e_plus/terse"], m["e_plus/steps"], m["e_minus/terse"], m["e_minus/steps"])
    assert counts == (2, 1, 1, 2)


# ---- (e) the buffer's SFT term -------------------------------------------------------------------

# no reward spread anywhere: no policy gradient and no transfer, only L_SFT
ALL_WRONG = [[[0] * 4] * 2] * 3


def test_buffer_step_equals_lambda2_times_the_naive_nll_of_each_experts_prompt_and_full_target(
        tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, ALL_WRONG))
    # every group with > K wrong is admitted
    monkeypatch.setattr(buffer_module, "uniform", lambda generator: 0.0)
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer_k=2, buffer_size=6, lambda2=0.3,
                          grad_clip=1e9, micro_batch_size=4)
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    m, delta = step(tok, ALL_WRONG, cfg, model)
    assert m["flushed"] == 6 and m["trained_rows"] == 0 and m["transfers"] == 0

    im_end = tok.get_vocab()["<|im_end|>"]  # the end-of-turn token every target ends with
    prompts = rendered_prompts(tok)
    own_or_first = lambda rec, e: rec.traces.get(e.name) or next(iter(rec.traces.values()))
    targets = [tok.encode(own_or_first(r, e), add_special_tokens=False) + [im_end]
               for r in RECORDS for e in EXPERTS]
    n_tokens = sum(len(t) for t in targets)

    def nll(model):
        return -sum(naive_logp(model, p, t).sum() for p, t in zip(prompts, targets)) / n_tokens
    hand = nll(twin)
    (0.3 * hand).backward()
    assert m["loss_sft"] == pytest.approx(hand.item(), rel=1e-5)
    assert m["loss"] == pytest.approx(0.3 * hand.item(), rel=1e-5)
    for d, p in zip(delta, twin.parameters()):
        torch.testing.assert_close(d, -p.grad, atol=1e-6, rtol=1e-4)


# ---- the k3 KL to a frozen reference, and the sampling temperature -------------------------------

def hand_policy_loss(model, ref, tok, table, G, temperature=1.0, beta=0.0):
    """sum over rows of [-A * sum_t logp + beta * sum_t k3] / N_tokens, k3 = exp(d) - d - 1,
    d = logp_ref - logp (Schulman's estimator); A = max(r - mean, 0). Log-probs of logits / T.
    Returns (loss to backprop, its value on-policy (the ratio is 1: -A per token),
    k3 token mean)."""
    prompts, comps = rendered_prompts(tok), completions_of(tok, table, G)
    n_tokens = sum(len(c) for c in comps)
    loss, k3_sum, value = 0.0, 0.0, 0.0
    for row, c in enumerate(comps):
        q, i, g = row // (2 * G), row // G % 2, row % G
        group = table[q][i]
        a = max(group[g] - sum(group) / G, 0.0)
        prompt = prompts[row // G]
        logits = model(torch.tensor([prompt + c]))[0, len(prompt) - 1:-1] / temperature
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
        loss = loss - a * logp.sum()
        value -= a * len(c)
        if beta:
            with torch.no_grad():
                ref_logits = ref(torch.tensor([prompt + c]))[0, len(prompt) - 1:-1] / temperature
                ref_logp = ref_logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None])[:, 0]
            d = ref_logp - logp
            k3 = d.exp() - d - 1
            loss = loss + beta * k3.sum()
            k3_sum += k3.sum().item()
    return loss / n_tokens, (value + beta * k3_sum) / n_tokens, k3_sum / n_tokens


def test_k3_to_a_perturbed_reference_moves_the_weights_and_the_log_as_computed_by_hand(
        tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer=False,
                          kl_beta=0.2, grad_clip=1e9, micro_batch_size=5)
    model = StandIn(dim=16)
    ref = copy.deepcopy(model)
    with torch.no_grad():  # the reference is another model: the k3 term is far from 0
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    twin = copy.deepcopy(model)
    m, delta = step(tok, MIXED, cfg, model, ref_model=ref)
    hand, value, k3_mean = hand_policy_loss(twin, ref, tok, MIXED, 4, beta=0.2)
    hand.backward()
    assert m["trained_rows"] == 24  # with a KL term every row has a gradient, zero advantage or not
    assert k3_mean > 0.05 and m["kl"] == pytest.approx(k3_mean, rel=1e-4)
    assert m["loss_grpo"] == pytest.approx(value, rel=1e-4)
    for d, p in zip(delta, twin.parameters()):
        torch.testing.assert_close(d, -p.grad, atol=1e-6, rtol=1e-4)


def test_training_log_probs_are_taken_at_the_sampling_temperature(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", answering_sampler(tok, MIXED))
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer=False,
                          temperature=0.6, grad_clip=1e9)
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    _, delta = step(tok, MIXED, cfg, model)
    hand, _, _ = hand_policy_loss(twin, None, tok, MIXED, 4, temperature=0.6)
    hand.backward()
    for d, p in zip(delta, twin.parameters()):
        torch.testing.assert_close(d, -p.grad, atol=1e-6, rtol=1e-4)
