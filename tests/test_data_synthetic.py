"""Tests for data/synthetic.py: deterministic for a seed, the difficulty knob does what it says, the
generator's own traces always verify (and a perturbed answer does not), splits never share a
question, and everything stays short enough for a byte-level model."""

import pytest

import data
import verify
from data import synthetic


def test_same_arguments_give_the_same_records():
    a = data.load("synthetic", "train", n=300, seed=3, difficulty=(1, 8))
    b = data.load("synthetic", "train", n=300, seed=3, difficulty=(1, 8))
    assert a == b
    assert a != data.load("synthetic", "train", n=300, seed=4, difficulty=(1, 8))
    # a prefix, whatever n
    assert a[:100] == data.load("synthetic", "train", n=100, seed=3, difficulty=(1, 8))
    assert len({r.id for r in a}) == len(a)


def test_difficulty_sets_terms_and_digits():
    assert [synthetic.shape(d) for d in range(1, 9)] == [(2, 1), (2, 2), (3, 2), (3, 3),
                                                         (4, 3), (4, 4), (5, 4), (5, 5)]
    for d in range(1, 9):
        terms, digits = synthetic.shape(d)
        for r in data.load("synthetic", "test", n=50, difficulty=d):
            assert r.meta["difficulty"] == d and len(r.meta["terms"]) == terms
            assert max(len(str(t)) for t in r.meta["terms"]) <= digits
            assert r.question == "+".join(map(str, r.meta["terms"])) + "=?"
            assert r.answer == str(sum(r.meta["terms"]))
    mixed = data.load("synthetic", "train", n=400, difficulty=(2, 5))
    assert {r.meta["difficulty"] for r in mixed} == {2, 3, 4, 5}
    with pytest.raises(ValueError):
        data.load("synthetic", "train", n=1, difficulty=0)
    with pytest.raises(ValueError):
        data.load("synthetic", "dev")


def test_every_expert_trace_verifies_and_a_wrong_sum_does_not():
    for r in data.load("synthetic", "train", n=2000, seed=1, difficulty=(1, 10)):
        assert set(r.traces) == {e.name for e in data.experts("synthetic")}
        wrong = str(int(r.answer) + 1)
        for trace in r.traces.values():
            assert verify.reward("synthetic", trace, r.answer) == 1.0
            assert verify.reward("synthetic", trace, wrong) == 0.0
            perturbed = trace.replace(f"#### {r.answer}", f"#### {wrong}")
            assert verify.reward("synthetic", perturbed, r.answer) == 0.0


def test_traces_of_each_style():
    terms = [47, 385, 9, 126]
    assert synthetic.chain_trace(terms) == "47+385=432\n432+9=441\n441+126=567\n#### 567"
    assert synthetic.columns_trace(terms) == "7+5+9+6=27\nc2+4+8+2=16\nc1+3+1=5\n#### 567"
    # the last carry leads the answer
    assert synthetic.columns_trace([99, 1]) == "9+1=10\nc1+9=10\n#### 100"
    assert synthetic.reverse_trace(terms) == "rev 765\n#### 567"


def test_columns_trace_reads_the_answer_off_its_lines():
    # the documented reading: the last line's sum, then the other lines' last digits, bottom-up
    for r in data.load("synthetic", "train", n=500, difficulty=(1, 10)):
        sums = [line.rsplit("=", 1)[1] for line in r.traces["columns"].splitlines()[:-1]]
        assert sums[-1] + "".join(s[-1] for s in reversed(sums[:-1])) == r.answer


def test_train_and_test_never_share_a_question():
    for d in (1, 2, 5):
        train = {r.question for r in data.load("synthetic", "train", n=2000, seed=0, difficulty=d)}
        test = {r.question for s in (0, 1)
                for r in data.load("synthetic", "test", n=500, seed=s, difficulty=d)}
        assert train and test and not train & test
        assert all(synthetic.split_of(q) == "test" for q in test)


def test_val_is_held_out_too_and_the_training_stream_is_the_one_it_always_was():
    import zlib
    for d in (1, 2):
        splits = {s: {r.question for r in data.load("synthetic", s, n=300, seed=0, difficulty=d)}
                  for s in ("train", "val", "test")}
        assert all(splits.values())
        assert not (splits["train"] & splits["val"] or splits["val"] & splits["test"])
        # train: the rule before val existed
        assert all(zlib.crc32(q.encode()) % 5 != 0 for q in splits["train"])


def test_complementary_testbed_mixes_many_small_terms_and_two_long_ones():
    recs = data.load("synthetic", "train", n=400, seed=1, difficulty=(1, 2),
                     testbed="complementary")
    shapes = [r.meta["shape"] for r in recs]
    assert 0.4 < shapes.count("many") / len(recs) < 0.6 and set(shapes) == {"many", "long"}
    for r in recs:
        terms, d = r.meta["terms"], r.meta["difficulty"]
        if r.meta["shape"] == "many":
            assert len(terms) == 4 + 2 * d and all(1 <= t <= 9 for t in terms)
        else:
            assert len(terms) == 2 and all(len(str(t)) == d for t in terms)
        assert r.answer == str(sum(terms)) and set(r.traces) == {"chain", "columns", "reverse"}
        assert all(verify.reward("synthetic", t, r.answer) == 1.0 for t in r.traces.values())
    experts = data.experts("synthetic", testbed="complementary")
    assert [e.name for e in experts] == ["chain", "columns", "reverse"]


def test_placebo_testbed_is_the_nested_questions_with_one_trace_format_under_three_names():
    nested = data.load("synthetic", "train", n=50, seed=2, difficulty=(1, 2))
    placebo = data.load("synthetic", "train", n=50, seed=2, difficulty=(1, 2), testbed="placebo")
    assert [r.question for r in placebo] == [r.question for r in nested]
    for p, n in zip(placebo, nested):
        assert set(p.traces) == {"alpha", "beta", "gamma"}
        assert set(p.traces.values()) == {n.traces["columns"]}
    experts = data.experts("synthetic", testbed="placebo")
    assert [e.name for e in experts] == ["alpha", "beta", "gamma"]
    with pytest.raises(data.UserError, match="complementary"):
        data.load("synthetic", "train", n=1, testbed="complimentary")


def test_short_enough_for_a_byte_level_model():
    for r in data.load("synthetic", "train", n=1000, difficulty=8):
        assert len(r.question.encode()) < 40
        assert all(len(t.encode()) < 150 for t in r.traces.values())
    assert all(len(e.system_prompt) < 60 for e in data.experts("synthetic"))
