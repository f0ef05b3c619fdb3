"""Tests for the memory changes of a RIEL/MEF step: chunked sampling gives the one-batch tokens and
step, the AdamW factory, and what is (not) alive while sampling and while the optimizer steps."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumbing import optim
import riel
from riel import HardExampleBuffer
from model import Transformer, tiny_config
from test_mef import Expert, Rec
from plumbing.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# system prompts of different lengths: chunks pad prompts to other lengths than the whole batch
EXPERTS = [Expert("terse", "Answer only."), Expert("steps", "Think step by step, then answer."),
           Expert("code", "Write a tiny program.")]
RECORDS = [Rec(i, q, "0", {"terse": "0", "steps": "so 0"})
           for i, q in enumerate(["3+4?", "19*21?", "100-7-7?"])]
TIMING = {"sample_s", "train_s", "tokens_per_s", "train_tokens_per_s"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


# mostly wrong, some spread: rewarded rows, transfers and buffer admissions all happen
def parity(rec, text):
    return float(len(text) % 3 == 0)


def step(tok, sample_batch_size, seed=0, steps=2):
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    opt = optim.make_optimizer(model.parameters(), lr=1e-3)
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=8, buffer_k=2, buffer_size=3,
                          micro_batch_size=8, sample_batch_size=sample_batch_size)
    gen, buf = torch.Generator().manual_seed(seed), HardExampleBuffer(cfg.buffer_size)
    logs = [riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, buf, gen, parity)
            for _ in range(steps)]
    return logs, model, gen


def test_chunked_sampling_gives_the_one_batch_completions(tok):
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=10)
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)

    def sample(sbs, seed=0, rng_rows=None, records=RECORDS):
        gen = torch.Generator().manual_seed(seed)
        c = riel.RIELConfig(**{**cfg.__dict__, "sample_batch_size": sbs})
        _, out = riel.sample_groups(model, tok, records, EXPERTS, c, gen, rng_rows)
        return out.completions, out.finish, gen.get_state()

    whole = sample(None)
    assert len(whole[0]) == len(RECORDS) * len(EXPERTS) * 4
    for sbs in (4, 20):  # one group per call; five (the last call partial)
        chunked = sample(sbs)
        assert chunked[:2] == whole[:2], sbs
        assert torch.equal(chunked[2], whole[2]), "the generator must end where one call leaves it"
    # a shard of a larger batch (dist.py): rows 12.. of 36, chunked, are the whole batch's rows 12..
    shard = sample(8, rng_rows=(12, 36), records=RECORDS[1:2])
    assert shard[0] == whole[0][12:24]
    # the tokens do depend on the draw (this comparison can fail)
    assert sample(8, seed=1)[0] != whole[0]


def test_chunked_sampling_gives_the_one_batch_steps_and_weights(tok, monkeypatch):
    whole, m_whole, g_whole = step(tok, None)
    calls, real = [], riel.generate

    def counting(m, prompts, **kw):
        calls.append(len(prompts) * kw["num_samples"])
        return real(m, prompts, **kw)
    monkeypatch.setattr(riel, "generate", counting)
    chunked, m_chunked, g_chunked = step(tok, 10)  # rounds down to 2 groups of 4 rows per call
    assert calls == [8, 8, 8, 8, 4] * 2
    assert sum(m["trained_rows"] for m in whole) > 0
    assert sum(m["transfer_pairs"] for m in whole) > 0
    assert sum(m["buffer_admitted"] for m in whole) > 0
    untimed = lambda log: {k: v for k, v in log.items() if k not in TIMING | {"entropy"}}
    for a, b in zip(whole, chunked):
        assert untimed(a) == untimed(b)
        # the same tokens; the entropy's float sums differ by batch shape (smaller matmuls), no more
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(m_whole.parameters(), m_chunked.parameters()))
    assert torch.equal(g_whole.get_state(), g_chunked.get_state())


def test_sample_batch_size_below_a_group_is_a_clear_error():
    with pytest.raises(ValueError, match="whole groups"):
        riel.RIELConfig(group_size=8, sample_batch_size=4)


def test_no_gradients_and_no_stale_weight_copies_while_sampling(tok, monkeypatch):
    """A caller that leaves gradients, or changes the weights inside the autocast region without
    dropping the cached bf16 copies, must not make sampling hold gradients or decode with the old
    weights."""
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    ids = torch.tensor([[256, 49, 43, 50, 61]])
    seen, real = {}, riel.generate

    def spy(m, prompts, **kw):
        seen["grads"] = [p.grad for p in m.parameters()]
        seen["logits"] = m(ids).float()
        return real(m, prompts, **kw)

    monkeypatch.setattr(riel, "generate", spy)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step leaves the weights as they are
    cfg = riel.RIELConfig(group_size=2, max_new_tokens=4, micro_batch_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # gradients, and bf16 copies of the weights in autocast's cache
        model(ids).float().sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)  # new weights: the cached copies are now stale
        riel.riel_step(model, tok, RECORDS[:1], EXPERTS[:2], cfg, opt, HardExampleBuffer(64),
                       torch.Generator().manual_seed(0), parity)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh region casts the current weights
        fresh = model(ids).float()
    assert all(g is None for g in seen["grads"])
    assert torch.equal(seen["logits"], fresh)


def test_weight_copies_are_dropped_before_the_optimizer_step():
    """The step's peak should not also hold autocast's bf16 copy of every weight: a forward run from
    inside the optimizer step, after the weights changed, must cast them afresh."""
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    ids = torch.tensor([[256, 49, 43, 50, 61]])

    class Probe(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5)
                self.inside = model(ids).float()

    opt = Probe(model.parameters(), lr=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids).float().logsumexp(-1).sum().backward()
        _, skipped = optim.clip_and_step(model, opt, 1.0, 0.0)
    assert not skipped
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(ids).float()
    assert torch.equal(opt.inside, fresh)
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_factory_foreach_on_cpu_is_torch_adamw_bit_for_bit():
    torch.manual_seed(0)
    init = [torch.randn(37, 11), torch.randn(11)]
    runs = {}
    makers = {"torch": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
              "ours": lambda ps: optim.make_optimizer(ps, lr=1e-2, weight_decay=0.1),
              "fused": lambda ps: optim.make_optimizer(ps, lr=1e-2, weight_decay=0.1, fused=True)}
    for name, make in makers.items():
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt, g = make(ps), torch.Generator().manual_seed(1)
        for _ in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        runs[name] = (ps, opt)
    ours, fused = runs["ours"][1], runs["fused"][1]
    assert ours.param_groups[0]["foreach"] is True and not ours.param_groups[0]["fused"]
    assert fused.param_groups[0]["fused"] is True and not fused.param_groups[0]["foreach"]
    assert ours.param_groups[0]["weight_decay"] == 0.1 and ours.param_groups[0]["lr"] == 1e-2
    assert all(torch.equal(a, b) for a, b in zip(runs["torch"][0], runs["ours"][0]))
    # the fused kernel: the same update, its own rounding
    for a, b in zip(runs["torch"][0], runs["fused"][0]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not any(math.isclose(float((a - b.detach()).abs().max()), 0.0)
                   for a, b in zip(init, runs["ours"][0]))
    # its state_dict is torch's (but foreach, asked for), and it loads torch's
    mine, theirs = runs["ours"][1].state_dict(), runs["torch"][1].state_dict()
    assert ([{**g, "foreach": None} for g in mine["param_groups"]] == theirs["param_groups"])
    assert all(torch.equal(mine["state"][i][k], theirs["state"][i][k])
               for i in theirs["state"] for k in theirs["state"][i])
    runs["ours"][1].load_state_dict(theirs)
    assert runs["ours"][1].state_dict()["state"][0]["step"] == 4


def test_a_tiny_run_never_imports_torch_dynamo_or_transformers(tmp_path):
    """~2 s and ~1 s of CPU a process: optim.AdamW skips the import of torch._dynamo torch.optim
    makes at the first step, zero_grad, state_dict and add_param_group; a model loaded from a
    directory skips the embedding init that imports it on meta; a tiny checkpoint's tokenizer
    loads as TinyTokenizer."""
    Transformer.from_config(tiny_config()).save_pretrained(str(tmp_path))
    load_tokenizer("tiny").save_pretrained(str(tmp_path))
    code = ("import sys, torch; from plumbing import optim; p = torch.nn.Parameter(torch.ones(3));"
            "o = optim.make_optimizer([p], lr=0.1); p.grad = torch.ones(3); o.step();"
            "o.zero_grad(); o.load_state_dict(o.state_dict()); assert p.grad is None;"
            "assert p.grad_fn is None and float(p[0]) < 1;"
            "from model import Transformer; from plumbing.tokenizer import load_tokenizer;"
            f"m = Transformer.from_pretrained({str(tmp_path)!r}).cpu();"
            f"tok = load_tokenizer({str(tmp_path)!r}); assert len(tok) == m.cfg.vocab_size;"
            "print(sorted({'torch._dynamo', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_sampling_under_autocast_casts_each_weight_once_per_call_not_per_token():
    """inference_mode keeps autocast from caching its bf16 weight copies, so generate samples under
    no_grad when autocast is on: the weights are cast at the first forward of a call, not again at
    every decode step."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from rollout import generate
    model = Transformer.from_config(tiny_config(), torch.device("cpu"), torch.float32, seed=0)
    weights = {p.data_ptr() for p in model.parameters() if p.dim() == 2}

    class CountWeightCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # a cast is _to_copy, or to.dtype where inference_mode keeps that composite op whole
            cast_ops = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
            if func in cast_ops and args[0].data_ptr() in weights:
                self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for new_tokens in (4, 16):
        with torch.autocast("cpu", dtype=torch.bfloat16), CountWeightCasts() as casts:
            out = generate(model, [[256, 49, 43]], num_samples=2, max_new_tokens=new_tokens,
                           seed=0)
        # no stop ids: every row decodes them all
        assert max(len(c) for c in out.completions) == new_tokens
        counts.append(casts.n)
    assert counts[0] == counts[1] and 0 < counts[0] <= len(weights)
