"""Tests for mel.py: who becomes a candidate, the analysis prompt, replay validation, the NLL, and
MEL inside a RIEL step (scripted samplers force every outcome) and inside train.py."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import mel
from riel import HardExampleBuffer
import riel
from rollout import Rollout
from conftest import requires_shared
from test_mef import StandIn, naive_nll
from test_riel import EXPERTS, RECORDS, TABLE, fake_generate_for, reward_fn, sgd_delta
from plumbing.tokenizer import load_tokenizer, render_chat


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


# ---- 1. candidates -------------------------------------------------------------------------------

def rewards_of(table):
    return torch.tensor(table, dtype=torch.float32)


def test_only_mixed_questions_give_pairs_and_the_cap_holds():
    r = rewards_of([[[1, 0, 0], [0, 0, 1]],  # q0 mixed: 2 right, 4 wrong -> 8 possible pairs
                    [[0, 0, 0], [0, 0, 0]],  # q1 all wrong
                    [[1, 1, 1], [1, 1, 1]],  # q2 all right
                    [[0, 0, 0], [0, 1, 0]]])  # q3 mixed: 1 right, 5 wrong
    flat = r.flatten()
    for cap, expected in ((1, {0: 1, 3: 1}), (3, {0: 3, 3: 3}), (100, {0: 8, 3: 5})):
        pairs = mel.contrastive_pairs(r, cap, torch.Generator().manual_seed(cap))
        per_question = {q: sum(p[0] == q for p in pairs) for q in (0, 3)}
        assert per_question == expected and len(pairs) == sum(expected.values())
        assert len(set(pairs)) == len(pairs), "pairs of one question are distinct"
        for q, w, right in pairs:
            assert flat[w] == 0 and flat[right] == 1, "a pair is (wrong, right)"
            assert w // 6 == q and right // 6 == q, "both answers belong to the pair's question"


def test_pairs_are_drawn_uniformly_and_seeded():
    r = rewards_of([[[1, 0], [0, 1]]])  # 2 right x 2 wrong = 4 pairs
    draws = [mel.contrastive_pairs(r, 1, g)[0]
             for g in [torch.Generator().manual_seed(0)] for _ in range(2000)]
    counts = {p: draws.count(p) for p in set(draws)}
    assert len(counts) == 4 and all(abs(c / 2000 - 0.25) < 0.04 for c in counts.values())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [mel.contrastive_pairs(r, 2, g1) for _ in range(5)] == \
        [mel.contrastive_pairs(r, 2, g2) for _ in range(5)]


def test_analysis_prompt_shows_question_then_the_incorrect_solution_first():
    text = mel.analysis_message("What is 2+2?", "WRONG-ANSWER 5", "RIGHT-ANSWER 4")
    assert text.startswith(mel.ANALYSIS_INSTRUCTION)
    assert text.index("What is 2+2?") < text.index("WRONG-ANSWER 5") < text.index("RIGHT-ANSWER 4")
    for section in ("Failure point", "Error pattern", "Success factor", "first person", "if-then",
                    "no numbers"):
        assert section in text


# ---- 2 + 3. analysis and replay with a scripted policy -------------------------------------------

def scripted_policy(tok, verdicts, calls):
    """A generate() stand-in. Analysis prompts (recognised by the instruction) get the next verdict
    of `verdicts` as their analysis text: 'good' / 'bad' / '' (empty); verdicts may also be a
    function of the prompt text. A replay prompt answers 'yes' (which reward_fn accepts) exactly
    when its hint holds a good analysis. Every call is recorded in `calls`."""
    it = iter(verdicts) if not callable(verdicts) else None

    def fake(model, prompts, *, max_new_tokens, stop_ids, temperature, **_):
        texts = [tok.decode(p) for p in prompts]
        kind = "analysis" if mel.ANALYSIS_INSTRUCTION.splitlines()[0] in texts[0] else "replay"
        calls.append(SimpleNamespace(kind=kind, texts=texts, temperature=temperature,
                                     max_new_tokens=max_new_tokens))
        if kind == "analysis":
            if it:
                outs = [f"{v} lesson {i}" if v else ""
                        for i, v in enumerate(next(it) for _ in texts)]
            else:
                outs = [f"{verdicts(t)} lesson" for t in texts]
        else:
            outs = ["yes 7" if "good lesson" in t else "no 3" for t in texts]
        comps = [tok.encode(o, add_special_tokens=False) + [stop_ids[0]] for o in outs]
        return Rollout(comps, ["stop"] * len(comps))
    return fake


def rollout_rows(tok, table):
    """The completions a step would hold for `table` (the scripted RIEL sampler's texts)."""
    prompts = [render_chat(tok, e.system_prompt, r.question) for r in RECORDS for e in EXPERTS]
    fake = fake_generate_for(tok, table)
    out = fake(None, prompts, num_samples=len(table[0][0]), max_new_tokens=8, stop_ids=[258])
    return out.completions


def test_replay_keeps_exactly_the_analyses_whose_replay_verifies(tok, monkeypatch):
    table = [[[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 1, 0, 0], [0, 0, 0, 0]]]  # both questions mixed
    comps, r = rollout_rows(tok, table), rewards_of(table)
    calls = []
    verdicts = ["good", "bad", "", "good", "bad", "good"]
    monkeypatch.setattr(mel, "generate", scripted_policy(tok, verdicts, calls))
    cfg = mel.MELConfig(enabled=True, pairs_per_question=3, max_analysis_tokens=40,
                        max_replay_tokens=9)
    examples, m = mel.collect(None, tok, RECORDS, EXPERTS, comps, r, cfg, 16, 1.0,
                              torch.Generator().manual_seed(0), reward_fn)
    analyses = [tok.decode(a, skip_special_tokens=True) for _, a in examples]
    assert analyses == ["good lesson 0", "good lesson 3", "good lesson 5"]
    assert m["mel/candidates"] == 6 and m["mel/written"] == 5 and m["mel/kept"] == 3
    assert m["mel/retention"] == pytest.approx(0.5) and m["mel/analysis_len"] > 0
    analysis_call, replay_call = calls
    assert len(replay_call.texts) == 5, "an empty analysis is not replayed"
    assert (analysis_call.temperature, analysis_call.max_new_tokens) == (1.0, 40)
    assert (replay_call.temperature, replay_call.max_new_tokens) == (0.0, 9)
    # the kept example's context is exactly the prompt the analysis was written from
    assert [tok.decode(c) for c, _ in examples] == [analysis_call.texts[i] for i in (0, 3, 5)]


def test_analysis_prompt_holds_the_rollouts_and_replay_uses_the_wrong_experts_prompt(tok,
                                                                                    monkeypatch):
    # q0: the only wrong answers are terse's
    table = [[[1, 0, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 0], [0, 0, 0, 0]]]
    comps, r = rollout_rows(tok, table), rewards_of(table)
    calls = []
    monkeypatch.setattr(mel, "generate", scripted_policy(tok, ["good"] * 8, calls))
    cfg = mel.MELConfig(enabled=True, pairs_per_question=8)
    mel.collect(None, tok, RECORDS, EXPERTS, comps, r, cfg, 16, 1.0,
                torch.Generator().manual_seed(1), reward_fn)
    analysis_call, replay_call = calls
    assert len(analysis_call.texts) == 8, "only q0 is mixed"
    text = lambda row: tok.decode(comps[row], skip_special_tokens=True)
    wrong_texts = {text(row) for row in (1, 2, 3)}
    right_texts = {text(row) for row in (0, 4, 5, 6, 7)}
    for prompt in analysis_call.texts:
        assert RECORDS[0].question in prompt
        wrong_at = prompt.index("Incorrect attempt:\n") + len("Incorrect attempt:\n")
        right_at = prompt.index("Correct attempt:\n", wrong_at) + len("Correct attempt:\n")
        first_line = lambda at: prompt[at:].split("\n")[0].split("<|")[0]  # noqa: E731
        assert first_line(wrong_at) in wrong_texts and first_line(right_at) in right_texts
    for prompt in replay_call.texts:
        assert EXPERTS[0].system_prompt in prompt and EXPERTS[1].system_prompt not in prompt
        assert "good lesson" in prompt and RECORDS[0].question in prompt


def test_each_replay_is_checked_against_its_own_questions_answer(tok, monkeypatch):
    table = [[[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 1, 0, 0], [0, 0, 1, 0]]]  # both questions mixed
    answer_of = lambda text: next(r.answer for r in RECORDS if r.question in text)  # noqa: E731

    # analyses say "lesson"; a replay answers its own question rightly
    def fake(model, prompts, *, stop_ids, **_):
        texts = [tok.decode(p) for p in prompts]
        analysis = mel.ANALYSIS_INSTRUCTION.splitlines()[0] in texts[0]
        outs = ["lesson" if analysis else f"yes {answer_of(t)}" for t in texts]
        comps = [tok.encode(o, add_special_tokens=False) + [stop_ids[0]] for o in outs]
        return Rollout(comps, ["stop"] * len(comps))
    monkeypatch.setattr(mel, "generate", fake)
    # the answers differ: 7, 81
    exact = lambda rec, text: float(text.strip() == f"yes {rec.answer}")  # noqa: E731
    cfg = mel.MELConfig(enabled=True, pairs_per_question=2)
    examples, m = mel.collect(None, tok, RECORDS, EXPERTS, rollout_rows(tok, table),
                              rewards_of(table), cfg, 16, 1.0, torch.Generator().manual_seed(0),
                              exact)
    assert m["mel/candidates"] == 4 and m["mel/kept"] == 4 and len(examples) == 4


def test_no_candidates_means_no_sampling_and_no_examples(tok, monkeypatch):
    calls = []
    monkeypatch.setattr(mel, "generate", scripted_policy(tok, [], calls))
    r = rewards_of([[[0, 0, 0, 0], [0, 0, 0, 0]], [[1, 1, 1, 1], [1, 1, 1, 1]]])
    examples, m = mel.collect(None, tok, RECORDS, EXPERTS, rollout_rows(tok, r.tolist()), r,
                              mel.MELConfig(), 16, 1.0, None, reward_fn)
    assert examples == [] and calls == [] and m["mel/candidates"] == 0 and m["mel/retention"] == 0.0


# ---- 4. the NLL ----------------------------------------------------------------------------------

def test_nll_is_the_per_sample_token_mean_over_the_analysis_tokens_only():
    model = StandIn(mix=False)
    contexts, analyses = [[5, 6, 7, 8], [9, 10]], [[20, 21, 258], [22, 23, 24, 25, 258]]
    loss = mel.nll_loss(model, contexts, analyses, n_examples=2)
    # the mean over samples, not over 8 tokens
    hand = sum(naive_nll(model, c, a) / len(a) for c, a in zip(contexts, analyses)) / 2
    torch.testing.assert_close(loss, hand)
    per_token = sum(naive_nll(model, c, a) for c, a in zip(contexts, analyses)) / 8
    assert not torch.allclose(loss, per_token)

    loss = mel.nll_loss(model, [contexts[0]], [analyses[0]], n_examples=1)
    loss.backward()
    g = model.hidden.grad[0].abs().sum(-1)  # (T,) gradient reaching each position's state
    P, C = 4, 3
    assert torch.all(g[:P - 1] == 0), "the context's own tokens carry no loss"
    assert torch.all(g[P - 1:P + C - 1] > 0), "every position that predicts an analysis token does"
    assert g[P + C - 1] == 0


def test_nll_micro_batches_give_the_full_batch_gradient():
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(0, 250, (int(n),), generator=g).tolist(),
                 torch.randint(0, 250, (int(m),), generator=g).tolist())
                for n, m in torch.randint(2, 12, (7, 2), generator=g)]
    grads = []
    for mbs in (1, 3, 7):
        model = StandIn(seed=0)
        value = mel.nll_backward(model, examples, mbs, weight=0.5)
        grads.append((value, [p.grad.clone() for p in model.parameters()]))
    for value, grad in grads[1:]:
        assert value == pytest.approx(grads[0][0], rel=1e-5)
        for a, b in zip(grad, grads[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    model = StandIn(seed=0)
    (0.5 * sum(naive_nll(model, c, a) / len(a) for c, a in examples) / 7).backward()
    for a, b in zip(grads[0][1], [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- 5. inside a RIEL step -----------------------------------------------------------------------

def test_mel_adds_weight_times_the_nll_gradient_to_the_rl_update(tok, monkeypatch):
    monkeypatch.setattr(riel, "generate", fake_generate_for(tok, TABLE))
    # an analysis is good when its correct attempt reads exactly "yes": 1 of q0's 3 right texts, so
    # 5 of 15 pairs
    verdict = lambda t: "good" if "Correct attempt:\nyes<" in t else "bad"
    monkeypatch.setattr(mel, "generate", scripted_policy(tok, verdict, []))
    cfg = riel.RIELConfig(group_size=4, grad_clip=1e9, buffer=False, micro_batch_size=3)
    # every pair: order-free
    mel_cfg = mel.MELConfig(enabled=True, weight=0.5, pairs_per_question=100)

    def step(model, use_mel):
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        m = riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, HardExampleBuffer(),
                           torch.Generator().manual_seed(0), reward_fn,
                           mel_cfg=mel_cfg if use_mel else None)
        return m, sgd_delta(model, before)

    base = StandIn(dim=16)
    m_plain, d_plain = step(copy.deepcopy(base), False)
    m_mel, d_mel = step(copy.deepcopy(base), True)
    assert not any(k.startswith("mel") for k in m_plain)
    # TABLE: only q0 is mixed (3 right, 5 wrong): 15 pairs
    assert (m_mel["mel/candidates"], m_mel["mel/kept"]) == (15, 5) and m_mel["mel_s"] >= 0
    examples, _ = mel.collect(None, tok, RECORDS, EXPERTS, rollout_rows(tok, TABLE),
                              rewards_of(TABLE), mel_cfg, 16, 1.0,
                              torch.Generator().manual_seed(0), reward_fn)
    assert len(examples) == 5
    ref = copy.deepcopy(base)
    nll = sum(naive_nll(ref, c, a) / len(a) for c, a in examples) / len(examples)
    (0.5 * nll).backward()
    assert m_mel["mel/loss_nll"] == pytest.approx(nll.item(), rel=1e-4)
    assert m_mel["loss"] == pytest.approx(m_plain["loss"] + 0.5 * nll.item(), rel=1e-4)
    for dm, dp, p in zip(d_mel, d_plain, ref.parameters()):  # SGD, lr 1: delta = -gradient
        torch.testing.assert_close(dm - dp, -p.grad, rtol=1e-4, atol=1e-6)


def test_real_tiny_model_writes_replays_and_learns_analyses(tok):
    from model import Transformer
    model = Transformer.from_pretrained("tiny")
    cfg = riel.RIELConfig(group_size=4, max_new_tokens=10, micro_batch_size=8, transfer=False,
                          buffer=False)
    mel_cfg = mel.MELConfig(enabled=True, pairs_per_question=2, max_analysis_tokens=12,
                            replay_temperature=1.0)
    # mixed groups, and some replays pass
    parity = lambda rec, text: float(len(text) % 2 == 0)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(4)  # a draw in which both questions are mixed at every step
    logs = [riel.riel_step(model, tok, RECORDS, EXPERTS, cfg, opt, HardExampleBuffer(), gen, parity,
                           mel_cfg=mel_cfg) for _ in range(3)]
    assert all(m["mel/candidates"] == 4 for m in logs), "2 mixed questions x 2 pairs"
    assert 0 < sum(m["mel/kept"] for m in logs) < 12, "replay keeps some analyses and drops others"
    assert all(0 < m["mel/analysis_len"] <= 12 for m in logs)
    kept = [m for m in logs if m["mel/kept"]]
    assert all(math.isfinite(m["mel/loss_nll"]) and m["mel/loss_nll"] > 0 for m in kept)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="pairs_per_question"):
        mel.MELConfig(pairs_per_question=0)


# ---- train.py --mel ------------------------------------------------------------------------------

def test_train_with_mel_writes_the_mel_metrics(tmp_path):
    import train
    from test_train import SMALL
    train.main(train.cli(["--mel", "--out-dir", str(tmp_path / "run"), *SMALL,
                          "--stages", "mef", "riel", "--mel.max-analysis-tokens", "8",
                          "--riel.steps", "2"]))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in lines if m["stage"] == "riel"]
    assert len(rl) == 2
    for key in ("mel/candidates", "mel/kept", "mel/retention", "mel/analysis_len", "mel/loss_nll",
                "mel_s"):
        assert key in rl[0], key
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["mel"]["enabled"] is True


# ---- real chat templates -------------------------------------------------------------------------

@requires_shared
@pytest.mark.parametrize("which", ["llama3", "qwen25"])
def test_mel_prompts_render_with_the_real_chat_templates(which):
    from test_tokenizer import llama3_tokenizer, qwen25_tokenizer
    tok = llama3_tokenizer() if which == "llama3" else qwen25_tokenizer()
    analysis = mel.analysis_message("How many legs do 3 cats have?", "3 * 3 = 9", "3 * 4 = 12")
    ids = render_chat(tok, None, analysis)
    text = tok.decode(ids)
    assert text.index("Incorrect attempt:\n3 * 3 = 9") < text.index("Correct attempt:\n3 * 4 = 12")
    assert text.rstrip().endswith("assistant<|end_header_id|>" if which == "llama3"
                                  else "<|im_start|>assistant")
    hint = tok.decode(render_chat(tok, "Think step by step.",
                                  mel.hint_message("How many legs?", "If counting legs, ...")))
    assert ("Think step by step." in hint
            and hint.index("If counting legs") < hint.index("Now solve:\nHow many legs?"))
