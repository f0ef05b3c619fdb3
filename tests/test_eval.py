"""eval.py: the vote, the pass@k estimator, and an end-to-end evaluation on the tiny preset."""

import itertools
import math

import data
import pytest
from eval import EvalConfig, evaluate, format_table, majority_vote, pass_at_k
from model import Transformer
from plumbing.tokenizer import load_tokenizer


def brute_force_pass_at_k(n, c, k):
    """The probability that k of the n samples, drawn without replacement, hold at least one
    correct one."""
    samples = [1] * c + [0] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


def test_pass_at_k_equals_brute_force():
    for n, c, k in [(8, 0, 1), (8, 2, 1), (8, 2, 4), (8, 5, 4), (6, 6, 3), (5, 1, 5)]:
        assert math.isclose(pass_at_k(n, c, k), brute_force_pass_at_k(n, c, k)), (n, c, k)


def test_majority_vote_takes_the_most_common_answer_and_breaks_ties_by_expert_order():
    assert majority_vote(["5", "7", "5"], [1.0, 0.0, 1.0]) == 1.0
    assert majority_vote(["7", "5", "5"], [0.0, 1.0, 1.0]) == 1.0
    # tie: the first expert's answer wins
    assert majority_vote(["7", "5", None], [0.0, 1.0, 0.0]) == 0.0
    assert majority_vote([None, None], [0.0, 0.0]) == 0.0


def test_evaluate_reports_every_expert_the_vote_and_pass_at_k():
    task = "synthetic"
    records = data.load(task, "test", n=6, difficulty=1)
    experts = data.experts(task)
    cfg = EvalConfig(size=4, max_new_tokens=8, batch_size=5, pass_k=2, pass_samples=3)
    model, tok = Transformer.from_pretrained("tiny"), load_tokenizer("tiny")
    res = evaluate(model, tok, task, records, experts, cfg)
    assert res["questions"] == 4 and set(res["accuracy"]) == {e.name for e in experts}
    assert 0.0 <= res["pass@2"] <= 1.0 and res["best_expert"] in res["accuracy"]
    assert "majority vote" in format_table(res)


# ---- evaluate's aggregation on a scripted completer with known answers ---------------------------

# 5 questions x 3 experts; greedy text of (question, expert). Answers 10, 20, 30, 40, 50.
SCRIPT = [["#### 11", "#### 10", "#### 10"],  # vote 10: right
          ["#### 21", "#### 20", "#### 22"],  # three-way tie: the first expert's 21 wins: wrong
          ["#### 30", "#### 31", "no idea"],  # tie 30 / 31: the first expert's 30 wins: right
          ["#### 41", "#### 40", "#### 41"],  # the majority's 41 beats the right 40: wrong
          # tie 50 / 59: the first answer given (columns, 50) wins: right
          ["no idea", "#### 50", "#### 59"]]
# by hand: chain 1/5, columns 4/5, reverse 1/5; best columns; vote 3/5
# c of n = 4 samples per prompt
CORRECT_SAMPLES = [[0, 1, 2], [2, 3, 4], [4, 0, 2], [1, 1, 1], [2, 2, 0]]


def scripted_generate(tok, records, experts):
    """A generate() stand-in that reads each prompt's question and expert and answers from SCRIPT
    (greedy) or with CORRECT_SAMPLES right answers among its samples (sampled)."""
    def fake(model, prompts, *, num_samples, temperature, stop_ids, **_):
        comps = []
        for p in prompts:
            text = tok.decode(p)
            q = next(i for i, r in enumerate(records) if r.question in text)
            e = next(i for i, ex in enumerate(experts) if f"system\n{ex.system_prompt}<" in text)
            if temperature == 0:
                outs = [SCRIPT[q][e]] * num_samples
            else:
                c = CORRECT_SAMPLES[q][e]
                outs = [f"#### {records[q].answer}"] * c + ["#### 0"] * (num_samples - c)
            comps += [tok.encode(o, add_special_tokens=False) + [stop_ids[0]] for o in outs]
        return type("Out", (), {"completions": comps, "finish": ["stop"] * len(comps)})
    return fake


def test_evaluate_aggregates_a_scripted_completer_as_computed_by_hand(monkeypatch):
    import eval as ev
    from test_mef import Rec, StandIn
    tok = load_tokenizer("tiny")
    records = [Rec(q, f"{10 * (q + 1)}+0=?", str(10 * (q + 1))) for q in range(5)]
    experts = data.experts("synthetic")  # chain, columns, reverse
    monkeypatch.setattr(ev, "generate", scripted_generate(tok, records, experts))
    # 15 prompts in batches of 4: a short last batch
    cfg = EvalConfig(batch_size=4, pass_k=2, pass_samples=4)
    res = evaluate(StandIn(), tok, "synthetic", records, experts, cfg)
    assert res["accuracy"] == {"chain": 0.2, "columns": 0.8, "reverse": 0.2}
    assert res["best_expert"] == "columns" and res["best_accuracy"] == 0.8
    assert res["majority_vote"] == pytest.approx(0.6)
    # pass@2 of n = 4: every c in 0..4 occurs, n - c == k among them (c = 2: 1 - 1/6, not 1)
    hand = [brute_force_pass_at_k(4, c, 2) for row in CORRECT_SAMPLES for c in row]
    assert res["pass@2"] == pytest.approx(sum(hand) / len(hand))
    # per expert (each column of CORRECT_SAMPLES): sampled pass@1 = c / n and pass@2, by hand
    for i, e in enumerate(experts):
        col = [row[i] for row in CORRECT_SAMPLES]
        assert res["sampled_by_expert"][e.name] == pytest.approx(
            {"pass@1": sum(col) / (4 * len(col)),
             "pass@2": sum(brute_force_pass_at_k(4, c, 2) for c in col) / len(col)})
    assert res["questions"] == 5
    # keep_texts: every answer with its own question, expert and verdict;
    # lengths in tokens (+ the stop token)
    kept = evaluate(StandIn(), tok, "synthetic", records, experts, EvalConfig(batch_size=4),
                    keep_texts=True)
    samples = [(s["question"], s["expert"], s["completion"], s["correct"]) for s in kept["samples"]]
    assert samples == [
        (r.question, e.name, SCRIPT[q][i], float(SCRIPT[q][i] == f"#### {r.answer}"))
        for q, r in enumerate(records) for i, e in enumerate(experts)]
    lengths = [len(tok.encode(SCRIPT[q][i], add_special_tokens=False)) + 1
               for q in range(5) for i in range(3)]
    assert res["completions/mean_length"] == pytest.approx(sum(lengths) / len(lengths))


def test_unseen_counts_each_expert_on_the_shapes_it_does_not_own(monkeypatch):
    """Disjoint testbeds: the records name their shape's owner; `unseen` counts every expert's
    greedy answers on the questions whose owner is another expert (by hand from SCRIPT)."""
    import eval as ev
    from test_mef import Rec, StandIn
    tok = load_tokenizer("tiny")
    owners = ["chain", "columns", "columns", "reverse", "chain"]
    records = [Rec(q, f"{10 * (q + 1)}+0=?", str(10 * (q + 1))) for q in range(5)]
    for r, o in zip(records, owners):
        r.meta = {"shape": "many", "owner": o}
    experts = data.experts("synthetic")
    monkeypatch.setattr(ev, "generate", scripted_generate(tok, records, experts))
    res = evaluate(StandIn(), tok, "synthetic", records, experts, EvalConfig(batch_size=4))
    right = [(q, e.name) for q, r in enumerate(records) for i, e in enumerate(experts)
             if SCRIPT[q][i] == f"#### {r.answer}"]
    # right answers off their owner's shape: columns and reverse on q0, chain on q2, columns on
    # q3 and q4 (columns on q1 is its own shape)
    assert sum(owners[q] != name for q, name in right) == 5
    assert res["unseen"] == {"correct": 5, "total": 5 * 2}
    plain = evaluate(StandIn(), tok, "synthetic", [Rec(0, "10+0=?", "10")], experts,
                     EvalConfig(batch_size=4))
    assert "unseen" not in plain  # no owners: not a disjoint testbed


def test_headline_deploys_the_validation_best_prompt_of_the_last_stage():
    from eval import headline
    acc = lambda c, r: {"accuracy": {"chain": c, "columns": r}}  # noqa: E731
    evals = {"after_mef": acc(0.5, 0.1), "after_mef@val": acc(0.5, 0.1),
             "after_riel": {**acc(0.30, 0.42), "unseen": {"correct": 7, "total": 20}},
             "after_riel@val": acc(0.40, 0.35)}
    # after RL chain is best on validation, so it is deployed though columns wins on test
    assert headline(evals) == {"deployed": "chain", "deployed_on": "val", "test_accuracy": 30.0,
                               "unseen_correct": 7, "unseen_total": 20}
    # no validation table: the held-out one chooses, and says so
    assert headline({"final": acc(0.2, 0.6)}) == {"deployed": "columns", "deployed_on": "final",
                                                  "test_accuracy": 60.0}
    assert headline({}) == {}
