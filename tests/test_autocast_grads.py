"""Autocast's cached weight casts and RIEL's gradients (pytorch/pytorch#112583).

Before torch 2.11 (fixed by pytorch/pytorch#165068) autocast kept the bf16 copy of a weight cast
under no_grad and handed it to later grad-enabled forwards in the same cache lifetime: a copy
without grad history, so that weight got no gradient, with no error. RIEL samples under no_grad with
autocast on purpose (rollout.generate caches the casts for its decode steps), and its transfer term
scores the teacher side under no_grad; grad-enabled forwards follow both, so riel.py drops the
cache in between. On the real tiny model, the real sampler and CPU bf16 autocast, for a step
trained by the policy-gradient term and for steps trained by the transfer term alone (both of its
modes):
- every trainable parameter gets a nonzero gradient, equal to the one of the same step run with the
  cache cleared after every no_grad pass by the test itself. Without riel.py's clears this fails on
  torch < 2.11 only;
- so, on any torch, the order is checked too: no grad-enabled forward follows a no_grad one (a
  decode step, the teacher's pass) without a clear in between, and after the sampler returns the
  cache is cleared before the first backward.
"""
import itertools

import pytest
import torch

import riel
from riel import HardExampleBuffer
from model import Transformer, tiny_config
from test_mef import Expert, Rec
from plumbing.tokenizer import load_tokenizer

EXPERTS = [Expert("terse", "Answer only."), Expert("steps", "Think step by step.")]
RECORDS = [Rec(0, "3+4?", "7"), Rec(1, "9*9?", "81")]
G = 4
SCENARIOS = ("policy_gradient", "transfer", "transfer_full_vocab")


def reward_by_row(scenario):
    """A reward_fn that scores by row (riel.score_groups asks in row order, row
    (q * N + i) * G + g). policy_gradient: every group 1, 0, 1, 0: spread in every group, equal
    expert means, so no transfer. transfer*: expert 0 always right, expert 1 always wrong: no
    spread (no policy-gradient row), a pair per question."""
    rows = itertools.count()
    if scenario == "policy_gradient":
        return lambda rec, text: float(next(rows) % 2 == 0)
    return lambda rec, text: float(next(rows) // G % len(EXPERTS) == 0)


def step_gradients(monkeypatch, scenario, clear_after_no_grad=False, events=None):
    """One riel_step under CPU bf16 autocast -> (metrics, {name: the gradient its optimizer step
    sees}); lr 0. clear_after_no_grad: the test itself clears the cache after the sampler and after
    every no_grad scoring pass. events: gets "sampled" (the sampler returned), "clear", "backward"
    and ("forward", grad enabled) in order."""
    record = events.append if events is not None else lambda e: None
    wrapped = {"generate": riel.generate, "token_logprobs": riel.token_logprobs,
               "completion_logits": riel.completion_logits}

    def wrap(name, fn):
        def run(*args, **kwargs):
            grad = torch.is_grad_enabled()
            out = fn(*args, **kwargs)
            if clear_after_no_grad and (name == "generate" or not grad):
                torch.clear_autocast_cache()
            if name == "generate":
                record("sampled")
            return out
        return run
    for name, fn in wrapped.items():
        monkeypatch.setattr(riel, name, wrap(name, fn))
    clear, backward = torch.clear_autocast_cache, torch.autograd.backward
    monkeypatch.setattr(torch, "clear_autocast_cache", lambda: (record("clear"), clear())[1])
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: (record("backward"), backward(*a, **k))[1])

    model = Transformer.from_config(tiny_config(), "cpu", torch.float32, seed=0)
    model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda *_: record(("forward", torch.is_grad_enabled())))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    opt.register_step_pre_hook(lambda *_: grads.update(
        {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}))
    mode = "full_vocab" if scenario == "transfer_full_vocab" else "sampled"
    cfg = riel.RIELConfig(group_size=G, max_new_tokens=6, buffer=False, micro_batch_size=4,
                          grad_clip=1e9, transfer_mode=mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = riel.riel_step(model, load_tokenizer("tiny"), RECORDS, EXPERTS, cfg, opt,
                           HardExampleBuffer(1), torch.Generator().manual_seed(0),
                           reward_by_row(scenario))
    monkeypatch.undo()
    return m, grads


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_weight_gets_the_gradient_of_a_fresh_cache(monkeypatch, scenario):
    m, grads = step_gradients(monkeypatch, scenario)
    pg = scenario == "policy_gradient"
    # the term the scenario means
    assert (m["trained_rows"] > 0, m["transfer_pairs"] > 0) == (pg, not pg)
    _, fresh = step_gradients(monkeypatch, scenario, clear_after_no_grad=True)
    assert grads.keys() == fresh.keys() and grads
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, (
            f"{name}: no gradient (a cast cached under no_grad reused?)")
        torch.testing.assert_close(g, fresh[name], msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_cache_is_cleared_between_no_grad_and_grad_enabled_forwards(monkeypatch, scenario):
    events = []
    step_gradients(monkeypatch, scenario, events=events)
    assert ("forward", False) in events and ("forward", True) in events and "backward" in events
    sampled = len(events) - 1 - events[::-1].index("sampled")
    first_backward = events.index("backward", sampled)
    assert "clear" in events[sampled:first_backward], (
        "no clear between the sampler's return and the first backward")
    stale = None  # the position of a no_grad forward not yet followed by a clear
    for i, e in enumerate(events):
        if e == ("forward", False):
            stale = i if stale is None else stale
        elif e == "clear":
            stale = None
        elif e == ("forward", True):
            assert stale is None, (f"grad-enabled forward {i} may reuse casts of no_grad forward "
                                   f"{stale}: {events}")
