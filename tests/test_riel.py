"""Tests for riel.py: transfer and buffer rules, and whole RIEL steps checked against hand
computations."""
import copy
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from losses import admit_hard_example
from riel import HardExample, HardExampleBuffer, reference_trace
import riel
from rollout import Rollout
import losses as transfer
from plumbing.tokenizer import load_tokenizer
from test_mef import Expert, Rec, StandIn

# ---- (d) transfer rules --------------------------------------------------------------------------


def test_choose_transfer_picks_best_and_worst_with_lowest_index_on_ties():
    # means .5 .25 .5 .25
    r = torch.tensor([[1., 0, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
    assert transfer.choose_transfer(r) == (0, 1)
    assert transfer.choose_transfer(torch.tensor([[0., 0], [1, 1], [1, 0]])) == (1, 0)


def test_choose_transfer_skips_ties_and_teachers_without_a_correct_answer():
    assert transfer.choose_transfer(torch.tensor([[1., 0], [0, 1]])) is None  # equal means
    assert transfer.choose_transfer(torch.zeros(3, 4)) is None  # all wrong
    assert transfer.choose_transfer(torch.ones(3, 4)) is None  # all right
    # better, but never correct
    assert transfer.choose_transfer(torch.tensor([[0.5, 0.5], [0., 0.]])) is None
    assert transfer.choose_transfer(torch.tensor([[1., 0.]])) is None  # one expert


def test_teacher_sample_is_a_uniformly_drawn_correct_response():
    r = torch.tensor([0., 1, 0, 1, 1, 0])
    g = torch.Generator().manual_seed(0)
    draws = [transfer.choose_teacher_samples(r, g)[0] for _ in range(3000)]
    assert set(draws) == {1, 3, 4}
    for k in (1, 3, 4):
        assert abs(draws.count(k) / 3000 - 1 / 3) < 0.03
    assert transfer.choose_teacher_samples(r, g, all_correct=True) == [1, 3, 4]
    again = torch.Generator().manual_seed(0)
    assert [transfer.choose_teacher_samples(r, again)[0] for _ in range(3000)] == draws  # seeded


# ---- (e) buffer rules ----------------------------------------------------------------------------


def test_buffer_never_admits_with_k_or_fewer_wrong():
    g = torch.Generator().manual_seed(0)
    for n_wrong in range(7):  # K = 6, G = 8
        r = torch.tensor([0.] * n_wrong + [1.] * (8 - n_wrong))
        assert not any(admit_hard_example(r, 6, g) for _ in range(300))


@pytest.mark.parametrize("n_wrong", [7, 8])
def test_buffer_admission_rate_is_k_over_g(n_wrong):
    g = torch.Generator().manual_seed(n_wrong)
    r = torch.tensor([0.] * n_wrong + [1.] * (8 - n_wrong))
    rate = sum(admit_hard_example(r, 6, g) for _ in range(4000)) / 4000
    assert abs(rate - 0.75) < 0.03  # binomial std at n = 4000 is 0.007


def test_buffer_flush_clears_and_counts():
    buf = HardExampleBuffer(capacity=2)
    buf.entries.append(HardExample(1, "a", [1, 2], [3, 258]))
    assert not buf.is_full()
    buf.entries.append(HardExample(2, "b", [1], [4, 258]))
    assert buf.is_full()
    out = buf.take_all()
    assert [e.question_id for e in out] == [1, 2] and buf.entries == [] and buf.flushes == 1


def test_buffer_round_trips_through_a_plain_json_dict():
    buf = HardExampleBuffer(capacity=64, flushes=3)
    buf.entries += [HardExample("q7", "eq", [1, 2, 3], [9, 258]),
                    HardExample(8, "prose", [4], [258])]
    d = json.loads(json.dumps(buf.to_dict()))
    assert HardExampleBuffer.from_dict(d) == buf


def test_reference_trace_prefers_the_experts_own_trace():
    rec = Rec(0, "q", "1", {"gold": "g trace", "eq": "e trace", "code": ""})
    assert reference_trace(rec, Expert("eq", "")) == "e trace"
    assert reference_trace(rec, Expert("code", "")) == "g trace"
    assert reference_trace(Rec(1, "q", "1", {}), Expert("eq", "")) is None


def test_config_rejects_unknown_options():
    for bad in ({"advantage": "ppo"}, {"transfer_mode": "kl"}, {"aggregation": "mean"},
                {"group_size": 0}):
        with pytest.raises(ValueError):
            riel.RIELConfig(**bad)
    assert riel.RIELConfig(advantage="dr_grpo").loss_aggregation() == "dr_grpo"
    assert riel.RIELConfig().loss_aggregation() == "token"


# ---- whole steps with a stand-in model and a fake sampler ----------------------------------------

EXPERTS = [Expert("terse", "Answer only."), Expert("steps", "Think step by step.")]
RECORDS = [Rec(0, "3+4?", "7", {"terse": "7", "steps": "3+4=7"}),
           Rec(1, "9*9?", "81", {"steps": "9*9=81"})]
# correct (1) / wrong (0) per (question, expert, sample); G = 4
TABLE = [[[1, 0, 0, 0], [1, 1, 0, 0]],  # q0: expert means .25 / .5 -> E+ = steps, E- = terse
         [[0, 0, 0, 0], [0, 0, 0, 0]]]  # q1: all wrong, zero spread, no transfer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def fake_generate_for(tok, table):
    """A sampler that returns scripted completions: 'yes...' for correct, 'no...' for wrong,
    lengths vary."""
    def fake(model, prompts, *, num_samples, max_new_tokens, stop_ids, **_):
        comps, N = [], len(table[0])
        for p in range(len(prompts)):
            for g in range(num_samples):
                ok = table[p // N][p % N][g]
                text = ("yes" if ok else "no") + "x" * ((p + 2 * g) % 4)
                comps.append(tok.encode(text, add_special_tokens=False) + [stop_ids[0]])
        return Rollout(comps, ["stop"] * len(comps))
    return fake


def reward_fn(rec, text):
    return float(text.startswith("yes"))


@pytest.fixture
def scripted(monkeypatch, tok):
    monkeypatch.setattr(riel, "generate", fake_generate_for(tok, TABLE))


def naive_logp(model, prompt, completion):
    """(C,) log p(completion token) from one full forward, independent of rollout.token_logprobs."""
    logits = model(torch.tensor([prompt + completion]))[0, len(prompt) - 1:-1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def sgd_delta(model, before):
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def run_step(tok, cfg, model=None, buffer=None, seed=0, reward=reward_fn, **kw):
    model = model or StandIn(dim=16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    buffer = buffer if buffer is not None else HardExampleBuffer(cfg.buffer_size)
    m = riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, buffer,
                       torch.Generator().manual_seed(seed), reward, **kw)
    return m, sgd_delta(model, before), buffer


def hand_advantages(mode):
    out = []
    for q in TABLE:
        for group in q:
            mean = sum(group) / len(group)
            std = statistics.stdev(group)  # Bessel
            for r in group:
                a = {"meml": max(r - mean, 0.0), "dr_grpo": r - mean,
                     "grpo": (r - mean) / (std + 1e-4)}[mode]
                out.append(a)
    return out


@pytest.mark.parametrize("mode", ["meml", "grpo", "dr_grpo"])
def test_policy_update_equals_hand_computed_gradient(scripted, tok, mode):
    cfg = riel.RIELConfig(group_size=4, advantage=mode, transfer=False, buffer=False, grad_clip=1e9,
                          max_new_tokens=16, micro_batch_size=3)
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    m, delta, _ = run_step(tok, cfg, model)

    prompts = [riel.render_chat(tok, e.system_prompt, r.question) for r in RECORDS for e in EXPERTS]
    comps = fake_generate_for(tok, TABLE)(None, prompts, num_samples=4, max_new_tokens=16,
                                          stop_ids=[258]).completions
    n_tokens = sum(len(c) for c in comps)
    norm = 16 * 16 if mode == "dr_grpo" else n_tokens  # Dr.GRPO: n_seqs * max_new_tokens
    hand = -sum(a * naive_logp(twin, prompts[row // 4], comps[row]).sum()
                for row, a in enumerate(hand_advantages(mode))) / norm
    hand.backward()
    # on-policy the ratio is 1: the loss VALUE is -A per token, its gradient that of -A * logp
    hand_value = -sum(a * len(comps[row]) for row, a in enumerate(hand_advantages(mode))) / norm
    assert abs(m["loss_grpo"] - hand_value) < 1e-6
    for d, p in zip(delta, twin.parameters()):
        torch.testing.assert_close(d, -p.grad, atol=1e-6, rtol=1e-4)
    # only rows with A != 0 are forwarded: meml keeps 3 above-mean rows, others skip zero-spread q1
    assert m["trained_rows"] == (3 if mode == "meml" else 8)


def test_metrics_report_rewards_spread_transfers_and_timing(scripted, tok):
    cfg = riel.RIELConfig(group_size=4, buffer_k=2, buffer_size=64, max_new_tokens=16)
    m, _, buf = run_step(tok, cfg)
    assert m["reward/terse"] == pytest.approx(1 / 8) and m["reward/steps"] == pytest.approx(2 / 8)
    assert m["reward"] == pytest.approx(3 / 16)
    assert m["zero_spread"] == 0.5 and m["zero_spread/terse"] == 0.5 and m["all_wrong"] == 0.5
    assert m["all_right"] == 0.0 and m["zero_signal_questions"] == 0.5
    assert m["transfers"] == 1 and m["transfer_pairs"] == 1
    assert m["e_plus/steps"] == 1 and m["e_minus/terse"] == 1 and m["e_plus/terse"] == 0
    assert m["buffer_size"] == len(buf.entries) == m["buffer_admitted"] and m["buffer_flushes"] == 0
    assert m["loss_transfer"] != 0 and m["loss_sft"] == 0 and not m["skipped"]
    expected = {"loss", "loss_grpo", "loss_transfer", "loss_sft", "completions/mean_length",
                "sample_s", "train_s", "tokens_per_s", "grad_norm", "lr",
                "completions/clipped_ratio", "clip_frac", "reward_std",
                "completions/min_length", "completions/max_length"}
    assert expected <= set(m) and all(math.isfinite(float(m[k])) for k in expected)


def test_transfer_term_value_and_gradient_flow_only_through_the_weak_expert(tok):
    model = StandIn(dim=16)
    twin = copy.deepcopy(model)
    p_plus, p_minus = [259, 10, 20, 30], [259, 11, 21, 31, 41]
    pairs = [(p_plus, p_minus, [70, 71, 72, 258]), (p_plus, p_minus, [73, 258])]
    cfg = riel.RIELConfig(lambda1=0.5, micro_batch_size=1)
    value = riel.transfer_backward(model, pairs, cfg)
    hand_value = sum((naive_logp(twin, p, o).detach() - naive_logp(twin, s, o)).sum()
                     for p, s, o in pairs) / 6
    assert abs(value - hand_value.item()) < 1e-5
    # the gradient is that of -0.5 * mean logp(O+ | P-): raising O+ under the weak prompt,
    # teacher untouched
    student_only = -0.5 * sum(naive_logp(twin, s, o).sum() for _, s, o in pairs) / 6
    student_only.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)


def test_full_vocab_transfer_equals_kl_div(tok):
    model = StandIn(dim=16)
    p_plus, p_minus, o = [259, 10, 20], [259, 11, 21, 31], [70, 71, 258]
    cfg = riel.RIELConfig(transfer_mode="full_vocab")
    value = riel.transfer_backward(model, [(p_plus, p_minus, o)], cfg)
    t = model(torch.tensor([p_plus + o]))[0, 2:-1].log_softmax(-1)
    s = model(torch.tensor([p_minus + o]))[0, 3:-1].log_softmax(-1)
    # sum over vocab and tokens / 3 tokens
    hand = F.kl_div(s, t, reduction="batchmean", log_target=True)
    assert abs(value - hand.item()) < 1e-6


def test_transfer_pairs_teach_the_weak_expert_a_correct_answer_of_the_strong_one():
    rewards = torch.tensor(TABLE, dtype=torch.float32)  # (Q=2, N=2, G=4)
    prompts = ["q0/terse", "q0/steps", "q1/terse", "q1/steps"]
    comps = [f"{p}/{g}" for p in prompts for g in range(4)]
    gen = torch.Generator().manual_seed(0)
    pairs, chosen = transfer.transfer_pairs(rewards, prompts, comps, gen)
    assert chosen == [(1, 0)] and len(pairs) == 1
    teacher, student, o = pairs[0]
    assert (teacher, student) == ("q0/steps", "q0/terse") and o in ("q0/steps/0", "q0/steps/1")
    pairs, _ = transfer.transfer_pairs(rewards, prompts, comps, all_correct=True)
    assert [o for *_, o in pairs] == ["q0/steps/0", "q0/steps/1"]


@pytest.mark.parametrize("mode,all_correct", [("sampled", True), ("full_vocab", False)])
def test_transfer_options_run_inside_a_step(scripted, tok, mode, all_correct):
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False, transfer_mode=mode,
                          transfer_all_correct=all_correct)
    m, _, _ = run_step(tok, cfg)
    assert m["transfers"] == 1 and m["transfer_pairs"] == (2 if all_correct else 1)
    # a full KL is positive
    assert m["loss_transfer"] != 0 and (mode == "sampled" or m["loss_transfer"] > 0)


def test_full_buffer_joins_an_sft_step_and_is_cleared(scripted, tok):
    cfg = riel.RIELConfig(group_size=4, buffer_k=2, buffer_size=2, max_new_tokens=16,
                          transfer=False)
    buf = HardExampleBuffer(capacity=2)
    buf.entries.append(HardExample(5, "steps", [259, 65], [66, 67, 258]))
    m, _, buf = run_step(tok, cfg, buffer=buf, seed=3)
    assert m["buffer_admitted"] >= 1 and m["flushed"] == 1 + m["buffer_admitted"]
    assert m["loss_sft"] > 0 and buf.entries == [] and buf.flushes == 1 and m["buffer_size"] == 0


def test_one_or_many_micro_batches_give_the_same_update(scripted, tok):
    cfg = dict(group_size=4, buffer_k=2, buffer_size=1, max_new_tokens=16, grad_clip=1e9)
    base = StandIn(dim=16)
    m1, d1, _ = run_step(tok, riel.RIELConfig(micro_batch_size=64, **cfg), copy.deepcopy(base))
    m2, d2, _ = run_step(tok, riel.RIELConfig(micro_batch_size=1, **cfg), copy.deepcopy(base))
    assert m1["flushed"] > 0 and m1["transfers"] == 1  # every term is exercised
    for k in ("loss", "loss_grpo", "loss_transfer", "loss_sft"):
        assert abs(m1[k] - m2[k]) < 1e-5
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_nan_reward_skips_the_optimizer_step(scripted, tok):
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, buffer=False)
    with pytest.warns(UserWarning, match="skipping"):
        m, delta, _ = run_step(tok, cfg, reward=lambda rec, text: float("nan"))
    assert m["skipped"] and all(torch.all(d == 0) for d in delta)


def test_ppo_epochs_and_reference_kl_run_and_report(scripted, tok):
    model = StandIn(dim=16)
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=16, ppo_epochs=3, kl_beta=0.1, clip_eps=0.01)
    m, _, _ = run_step(tok, cfg, model, ref_model=copy.deepcopy(model))
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)  # identical reference at the first epoch
    assert m["clip_frac"] > 0  # later epochs move the ratio outside [0.99, 1.01]
    with pytest.raises(ValueError, match="ref_model"):
        run_step(tok, riel.RIELConfig(group_size=4, kl_beta=0.1))


# ---- the real tiny preset through the real sampler -----------------------------------------------

def test_real_tiny_model_end_to_end(tok):
    from model import Transformer
    model = Transformer.from_pretrained("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=12, buffer_k=2, buffer_size=1,
                          micro_batch_size=4)
    buf = HardExampleBuffer(cfg.buffer_size)
    gen = torch.Generator().manual_seed(0)
    parity = lambda rec, text: float(len(text) % 5 == 0)  # noqa: E731  (mostly wrong, some spread)
    before = [p.detach().clone() for p in model.parameters()]
    logs = [riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, buf, gen, parity)
            for _ in range(2)]
    assert all(math.isfinite(m["loss"]) and not m["skipped"] for m in logs)
    assert 0 < logs[0]["completions/mean_length"] <= 12
    assert 0 < logs[0]["entropy"] < math.log(len(tok))
    assert sum(m["buffer_admitted"] for m in logs) >= 1 and logs[-1]["buffer_size"] == 0
    assert logs[-1]["buffer_flushes"] == sum(m["flushed"] > 0 for m in logs)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_full_vocab_transfer_gradient_is_lambda1_times_the_naive_kl_gradient(tok):
    """The full-vocabulary mode weighs its term by lambda1 as the sampled mode does (issue 30: a
    mutation dropping it passed the whole suite): gradient == lambda1 * grad of KL(sg[p+] || p-)
    written out here."""
    model, twin = StandIn(dim=16), None
    twin = copy.deepcopy(model)
    p_plus, p_minus, o = [259, 10, 20], [259, 11, 21, 31], [70, 71, 258]
    cfg = riel.RIELConfig(transfer_mode="full_vocab", lambda1=0.3)
    riel.transfer_backward(model, [(p_plus, p_minus, o)], cfg)
    with torch.no_grad():
        t = twin(torch.tensor([p_plus + o]))[0, 2:-1].log_softmax(-1)
    s = twin(torch.tensor([p_minus + o]))[0, 3:-1].log_softmax(-1)
    (0.3 * (t.exp() * (t - s)).sum() / len(o)).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-7, rtol=1e-5)


def test_the_buffer_admits_each_expert_on_its_own_groups_rewards(tok, monkeypatch):
    """An expert is admitted for ITS group's failures, never another expert's (issue 30: a mutation
    reading the next expert's rewards passed the whole suite)."""
    import losses
    import riel
    # every eligible group admitted
    monkeypatch.setattr(losses, "uniform", lambda generator=None: 0.0)
    experts = [Expert("a", "A."), Expert("b", "B."), Expert("c", "C.")]
    records = [Rec(i, f"q{i}", "1", {"a": "x", "b": "y", "c": "z"}) for i in range(3)]
    wrong, right = [0.0] * 4, [1.0] * 4
    rewards = torch.tensor([[wrong, right, right],   # q0: a fails
                            [right, wrong, right],   # q1: b fails
                            [right, right, wrong]])  # q2: c fails
    prompts = [[i, j] for i in range(3) for j in range(3)]
    buf = HardExampleBuffer(capacity=99)
    n = riel.admit_hard_examples(buf, tok, records, experts, prompts, rewards, 2)
    admitted = [(e.question_id, e.expert) for e in buf.entries]
    assert n == 3 and admitted == [(0, "a"), (1, "b"), (2, "c")]
    assert [e.prompt_ids for e in buf.entries] == [[0, 0], [1, 1], [2, 2]]


def test_lambda1_warms_up_linearly_through_train_py(tmp_path, monkeypatch):
    """--riel.lambda1-warmup W: step s (0-based) weighs the transfer lambda1 * min(1, (s+1)/W);
    the run's own config keeps lambda1 as given."""
    import train
    seen, real = [], train.riel_step
    monkeypatch.setattr(train, "riel_step", lambda model, tok, batch, experts, rc, *a, **k:
                        seen.append(rc.lambda1) or real(model, tok, batch, experts, rc, *a, **k))
    train.main(train.cli(["--out-dir", str(tmp_path), "--stages", "riel", "--no-curves",
                          "--train-size", "16", "--riel.steps", "5", "--riel.questions-per-step",
                          "2", "--riel.group-size", "2", "--riel.max-new-tokens", "4",
                          "--riel.lambda1", "0.8", "--riel.lambda1-warmup", "4",
                          "--eval-every", "0"]))
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["riel"]["lambda1"] == 0.8


@pytest.mark.parametrize("cap,bites", [(0.05, True), (100.0, False)])
def test_transfer_cap_scales_the_transfer_gradient_to_cap_times_the_grpo_one(cap, bites):
    """Naive reference: both terms' gradients by autograd.grad, then g_pg + min(1, cap |g_pg| /
    |g_t|) g_t; what TermNorms leaves in .grad after marking grpo then transfer."""
    from plumbing.optim import TermNorms
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x = torch.randn(5, 4)
    l_pg = lambda: net(x).sum()  # noqa: E731
    l_t = lambda: 7 * (net(x) ** 2).mean()  # noqa: E731
    params = list(net.parameters())
    g_pg, g_t = torch.autograd.grad(l_pg(), params), torch.autograd.grad(l_t(), params)
    norm = lambda g: torch.sqrt(sum((t ** 2).sum() for t in g))  # noqa: E731
    scale = min(1.0, cap * norm(g_pg).item() / norm(g_t).item())
    assert (scale < 1) == bites
    norms = TermNorms(net, True, cap=cap)
    l_pg().backward()
    norms.mark("grpo")
    l_t().backward()
    norms.mark("transfer")
    for p, a, b in zip(params, g_pg, g_t):
        torch.testing.assert_close(p.grad, a + scale * b)
    m = norms.metrics()
    assert m["grad_norm/transfer"] == pytest.approx(scale * norm(g_t).item(), rel=1e-5)
    assert ("grad_norm/transfer_uncapped" in m) == (scale < 1)
    assert m["grad_share/transfer"] + m["grad_share/grpo"] == pytest.approx(1.0)
    if scale < 1:
        assert m["grad_norm/transfer"] == pytest.approx(cap * m["grad_norm/grpo"], rel=1e-5)


def test_transfer_cap_through_train_py_and_refused_when_negative(tmp_path, monkeypatch):
    import train
    from plumbing.errors import UserError
    # about a third of the answers "right": groups with a teacher, so the transfer has pairs
    monkeypatch.setattr(train.verify, "reward", lambda task, text, ans: float(len(text) % 3 == 0))
    args = ["--out-dir", str(tmp_path), "--stages", "riel", "--no-curves", "--train-size", "16",
            "--riel.steps", "4", "--riel.questions-per-step", "2", "--riel.group-size", "4",
            "--riel.max-new-tokens", "6", "--eval-every", "0", "--riel.lambda1", "50"]
    with pytest.raises(UserError, match="transfer-cap"):
        train.main(train.cli(args + ["--riel.transfer-cap", "-1"]))
    train.main(train.cli(args + ["--riel.transfer-cap", "0.25"]))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m.get("stage") == "riel"]
    assert rl and all(m["grad_norm/transfer"] <= 0.25 * m["grad_norm/grpo"] * (1 + 1e-5)
                      for m in rl)
    assert any(m.get("grad_norm/transfer_uncapped", 0) > m["grad_norm/transfer"] for m in rl)
