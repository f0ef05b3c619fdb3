"""Tests for mef.py: assistant-only loss, micro-batch invariance, example building, and that it
learns."""
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import mef
from plumbing import optim
from plumbing.tokenizer import end_of_turn_id, load_tokenizer, render_chat


class StandIn(nn.Module):
    """A tiny LM with the attributes rollout.token_logprobs uses (embed_tokens, trunk, lm_head).
    mix=False makes it a bigram model: the hidden state at t depends on token t only, so the
    gradient at position t comes from the prediction made at t alone."""

    def __init__(self, vocab=264, dim=16, mix=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.mix = mix

    def trunk(self, ids, positions=None, cache=None, mask=None):
        h = self.embed_tokens(ids)  # (B, T, dim)
        if self.mix:  # causal running mean: the prompt conditions the answer
            h = h + h.cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
        if h.requires_grad:
            h.retain_grad()
        self.hidden = h
        return h

    def forward(self, ids, positions=None, cache=None, mask=None, hidden_only=False):
        h = self.trunk(ids)
        return h if hidden_only else self.lm_head(h)


@dataclass
class Rec:
    id: int
    question: str
    answer: str
    traces: dict = field(default_factory=dict)


@dataclass
class Expert:
    name: str
    system_prompt: str


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def naive_nll(model, prompt, target):
    """-sum log p(target | prompt) from one full forward, independent of token_logprobs."""
    ids = torch.tensor([prompt + target])
    logits = model(ids)[0, len(prompt) - 1:-1]  # position t predicts token t+1
    return -logits.log_softmax(-1).gather(-1, torch.tensor(target)[:, None]).sum()


def test_loss_is_token_mean_nll_of_assistant_tokens_only():
    model = StandIn(mix=False)
    prompts, targets = [[5, 6, 7, 8], [9, 10]], [[20, 21, 258], [22, 258]]
    loss = mef.sft_loss(model, prompts, targets, n_tokens=5)
    hand = sum(naive_nll(model, p, t) for p, t in zip(prompts, targets)) / 5
    torch.testing.assert_close(loss, hand)

    loss = mef.sft_loss(model, [prompts[0]], [targets[0]], n_tokens=3)
    loss.backward()
    g = model.hidden.grad[0].abs().sum(-1)  # (T,) gradient reaching the state at each position
    P, C = 4, 3
    assert torch.all(g[:P - 1] == 0), "positions that predict prompt tokens must get no gradient"
    assert torch.all(g[P - 1:P + C - 1] > 0), "positions that predict the target must"
    assert g[P + C - 1] == 0, "the last token predicts nothing"


def test_micro_batches_give_the_full_batch_loss_and_gradient():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 7, 4, 5, 9)]
    targets = [torch.randint(0, 256, (n,), generator=g).tolist() + [258] for n in (1, 6, 2, 8, 3)]
    model = StandIn()
    full = mef.sft_backward(model, prompts, targets, micro_batch_size=8)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    split = mef.sft_backward(model, prompts, targets, micro_batch_size=2)
    assert abs(full - split) < 1e-6
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)
    hand = (sum(naive_nll(model, p, t) for p, t in zip(prompts, targets)).item()
            / sum(map(len, targets)))
    assert abs(full - hand) < 1e-5


def test_length_sorted_micro_batches_cover_every_index_once():
    mbs = optim.length_sorted_micro_batches([5, 1, 9, 3, 7], 2)
    assert mbs == [[1, 3], [0, 4], [2]]


def test_build_examples_skips_and_counts_missing_traces(tok):
    experts = [Expert("prose", "Explain."), Expert("eq", "Equations."), Expert("code", "Code.")]
    recs = [Rec(0, "1+1?", "2", {"prose": "one and one is 2", "eq": "1+1=2"}),
            Rec(1, "2+2?", "4", {"prose": "two and two is 4", "eq": "", "code": "print(2+2)" * 50})]
    examples, counts = mef.build_sft_examples(tok, recs, experts, max_len=200)
    assert counts == {"examples": 3, "missing_trace": 2, "too_long": 1}
    assert [(e.question_id, e.expert) for e in examples] == [(0, "prose"), (0, "eq"), (1, "prose")]
    e = examples[1]
    assert e.prompt_ids == render_chat(tok, "Equations.", "1+1?")
    assert e.target_ids[-1] == end_of_turn_id(tok)
    assert tok.decode(e.target_ids[:-1]) == "1+1=2"
    assert mef.build_sft_examples(tok, recs, experts[:1])[1]["examples"] == 2  # single-expert SFT


def test_a_few_steps_reduce_the_loss(tok):
    experts = [Expert("a", "Answer tersely."), Expert("b", "Show work.")]
    recs = [Rec(i, f"{i}+{i}?", str(2 * i), {"a": str(2 * i), "b": f"{i}+{i}={2 * i}"})
            for i in range(6)]
    examples, _ = mef.build_sft_examples(tok, recs, experts)
    model = StandIn(dim=32)
    cfg = mef.MEFConfig(epochs=8, batch_size=6, micro_batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    logs = list(mef.mef_steps(model, examples, cfg, opt, seed=0))
    assert len(logs) == 8 * 2
    assert set(logs[0]) >= {"loss", "tokens", "lr", "grad_norm", "step", "skipped"}
    assert logs[0]["lr"] == 3e-2 and not any(m["skipped"] for m in logs)
    first, last = sum(m["loss"] for m in logs[:2]) / 2, sum(m["loss"] for m in logs[-2:]) / 2
    assert last < 0.7 * first, (first, last)


def test_non_finite_loss_skips_the_step():
    model = StandIn()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model.embed_tokens.weight.grad = torch.ones_like(model.embed_tokens.weight)
    with pytest.warns(UserWarning, match="skipping"):
        _, skipped = optim.clip_and_step(model, opt, 1.0, float("nan"))
    assert skipped
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_real_tiny_preset_learns_its_traces(tok):
    from model import Transformer
    model = Transformer.from_pretrained("tiny")
    experts = [Expert("a", "Answer tersely."), Expert("b", "Show work.")]
    recs = [Rec(i, f"{i}+{i}?", str(2 * i), {"a": str(2 * i), "b": f"{i}+{i}={2 * i}"})
            for i in range(4)]
    examples, _ = mef.build_sft_examples(tok, recs, experts)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = mef.MEFConfig(epochs=6, batch_size=8, micro_batch_size=4)
    logs = list(mef.mef_steps(model, examples, cfg, opt))
    assert logs[-1]["loss"] < 0.7 * logs[0]["loss"], (logs[0]["loss"], logs[-1]["loss"])


def test_mef_resumed_at_a_step_takes_the_same_batches_as_an_uninterrupted_run(monkeypatch):
    examples = [mef.SFTExample(i, "e", [1, 2], [3 + i, 4]) for i in range(10)]
    cfg = mef.MEFConfig(epochs=2, batch_size=3, micro_batch_size=2)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = []  # the targets each optimizer step trained on
    monkeypatch.setattr(mef, "sharded_sft_backward",
                        lambda m, p, t, mbs, weight=1.0: seen.append(t) or 0.0)
    list(mef.mef_steps(model, examples, cfg, opt, seed=5))
    full, seen[:] = list(seen), []
    list(mef.mef_steps(model, examples, cfg, opt, seed=5, start_step=3))
    assert len(full) == mef.num_steps(10, cfg) == 8
    assert seen == full[3:]


def test_forwards_after_a_step_see_the_new_weights_inside_one_autocast_region():
    """train.py runs a whole stage inside one autocast region (bf16 compute on CUDA). Autocast
    caches the bf16 copy of every fp32 weight until the region ends, keyed by the weight tensor, not
    its version: without clip_and_step dropping that cache, every forward after the first optimizer
    step would still use the weights of before it. Checked here with CPU autocast, which caches the
    same way."""
    from model import Transformer, tiny_config
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([[256, 49, 43, 50, 61]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids)
        before.float().logsumexp(-1).sum().backward()
        optim.clip_and_step(model, opt, 1.0, 0.0)
        after = model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(ids)  # a new region casts the updated weights
    assert not torch.equal(fresh, before)
    assert torch.equal(after, fresh)
