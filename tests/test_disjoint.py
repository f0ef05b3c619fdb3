"""The positive control's machinery (issue 29): the disjoint testbeds and --sft-cross, the taught/
meter, the two rescue nulls against hand-built reward tables, the content-matched control
(--sft-replay replays exactly what the buffer flushed), and experiments/dose_response.py --quick
end to end."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
from plumbing import premise
import train
from data.synthetic import OWNERS, cross_kept
from losses import CORRECT
from plumbing.errors import UserError
from test_mef import Expert

ROOT = Path(__file__).resolve().parents[1]
TWO = [Expert("a", "A."), Expert("b", "B.")]


# ---- data: who sees which trace in MEF -----------------------------------------------------------

@pytest.mark.parametrize("testbed", ["disjoint", "disjoint_same"])
def test_at_p0_each_expert_gets_only_its_own_shapes_traces_and_at_p1_all(testbed):
    owner = OWNERS[testbed]
    full = data.load("synthetic", "train", n=400, testbed=testbed, difficulty=(1, 2))
    p0 = data.load("synthetic", "train", n=400, testbed=testbed, difficulty=(1, 2), sft_cross=0.0)
    p1 = data.load("synthetic", "train", n=400, testbed=testbed, difficulty=(1, 2), sft_cross=1.0)
    assert [r.question for r in p0] == [r.question for r in full] == [r.question for r in p1]
    assert {r.meta["shape"] for r in full} == {"many", "long"}
    assert all(list(r.traces) == [owner[r.meta["shape"]]] for r in p0)
    assert all(r.traces == f.traces and len(r.traces) == 2 for r, f in zip(p1, full))
    assert [e.name for e in data.experts("synthetic", testbed=testbed)] == list(owner.values())


def test_the_cross_dose_is_a_stable_monotone_share_of_the_questions():
    kept = lambda p: {r.id for r in data.load("synthetic", "train", n=2000, testbed="disjoint",
                                              difficulty=(2, 2), sft_cross=p)
                      if len(r.traces) == 2}  # noqa: E731
    k1, k3 = kept(0.1), kept(0.3)
    assert 0.07 < len(k1) / 2000 < 0.13 and 0.26 < len(k3) / 2000 < 0.34
    # a question kept at 0.1 is kept at 0.3; the same in every call
    assert k1 <= k3 and kept(0.1) == k1
    assert cross_kept("synthetic-train-0-7", 0.5) == cross_kept("synthetic-train-0-7", 0.5)


def test_disjoint_shapes_and_formats():
    recs = data.load("synthetic", "test", n=200, testbed="disjoint", difficulty=(2, 2))
    for r in recs:
        terms = r.meta["terms"]
        assert len(terms) == 5 and max(terms) <= 9 if r.meta["shape"] == "many" else \
            len(terms) == 2 and all(10 <= t <= 99 for t in terms)
    same = data.load("synthetic", "test", n=200, testbed="disjoint_same", difficulty=(2, 2))
    # the same questions, one format
    assert [r.question for r in same] == [r.question for r in recs]
    assert all(r.traces["alpha"] == r.traces["beta"] == s.traces["columns"]
               for r, s in zip(same, recs))


def test_sft_cross_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train.data, "load",
                        lambda *a, **k: pytest.fail("data loaded before the check"))
    for args in (["--sft-cross", "0.5"], ["--testbed", "disjoint", "--sft-cross", "1.5"]):
        with pytest.raises(UserError, match="--sft-cross"):
            train.main(train.cli(["--out-dir", str(tmp_path / "x"), *args]))
    with pytest.raises(UserError, match="--sft-replay"):
        train.main(train.cli(["--out-dir", str(tmp_path / "x"),
                              "--sft-replay", str(tmp_path / "missing.jsonl")]))


# ---- the meter: taught/ and the nulls ------------------------------------------------------------

def test_taught_is_the_share_of_questions_where_the_expert_is_e_minus():
    r = torch.zeros(4, 3, 2)
    m = premise.step_metrics(r, [Expert("a", "A."), Expert("b", "B."), Expert("c", "C.")],
                             chosen=[(0, 2), (1, 2), (2, 1)], correct=CORRECT)
    assert (m["taught/a"], m["taught/b"], m["taught/c"]) == (0.0, 0.25, 0.5)


def counts_table(k):
    """(Q, N) correct counts out of G = 8 -> rewards (Q, N, 8)."""
    k = torch.as_tensor(k)
    return (torch.arange(8)[None, None, :] < k[..., None]).float()


def test_nulls_of_experts_that_fail_the_same_or_different_questions():
    half = [8] * 50 + [0] * 50
    # both right on the first 50, wrong on the rest
    same = counts_table(torch.tensor([half, half]).T)
    split = counts_table(torch.tensor([half, half[::-1]]).T)  # each right where the other is wrong
    for rewards, observed in ((same, 0.0), (split, 0.5)):
        assert premise.rescue(rewards, TWO, correct=CORRECT)["rescued/a"] == observed
        nulls = premise.rescue_nulls(rewards, TWO, correct=CORRECT)
        # independent: P(a all wrong) * P(b right) = .5 * .5, whichever questions they are
        assert nulls["independent/a"] == pytest.approx(0.25)
        # same difficulty: p in {0, 1}, both experts at the same quantile -> nobody is ever rescued
        assert nulls["same_difficulty/a"] == pytest.approx(0.0, abs=0.01)


def test_the_independent_null_is_the_mean_over_independently_shuffled_questions():
    rng = np.random.default_rng(0)
    k = torch.tensor(rng.binomial(8, rng.beta(0.5, 2.0, size=(60, 3))))
    rewards = counts_table(k)
    three = [Expert("a", "A."), Expert("b", "B."), Expert("c", "C.")]
    shuffled = []
    for _ in range(3000):  # naive reference: each expert's questions permuted on its own
        perm = torch.stack([k[torch.from_numpy(rng.permutation(60)), i] for i in range(3)], 1)
        shuffled.append(premise.rescue(counts_table(perm), three, correct=CORRECT)["rescued/b"])
    assert premise.rescue_nulls(rewards, three, correct=CORRECT)["independent/b"] == \
        pytest.approx(np.mean(shuffled), abs=0.01)


def test_the_same_difficulty_null_recovers_a_comonotone_simulation():
    """Data made under the null itself: each expert's per-question success probability from its own
    Beta, both at the same difficulty rank (sorted draws paired in order), counts Binomial(8, p).
    The null, fitted from the counts alone, must predict the rescue these data show; the independent
    null must predict more."""
    rng = np.random.default_rng(1)
    Q = 6000
    # comonotone: paired by rank
    pa, pb = np.sort(rng.beta(0.7, 1.5, Q)), np.sort(rng.beta(0.4, 2.5, Q))
    k = torch.tensor(np.stack([rng.binomial(8, pa), rng.binomial(8, pb)], 1))
    rewards = counts_table(k)
    observed = premise.rescue(rewards, TWO, correct=CORRECT)
    nulls = premise.rescue_nulls(rewards, TWO, correct=CORRECT)
    for e in ("a", "b"):
        assert nulls[f"same_difficulty/{e}"] == pytest.approx(observed[f"rescued/{e}"], abs=0.015)
        assert nulls[f"independent/{e}"] > observed[f"rescued/{e}"] + 0.02


def test_beta_binomial_fit_recovers_its_parameters():
    rng = np.random.default_rng(2)
    k = rng.binomial(8, rng.beta(0.6, 1.8, size=200_000)).astype(float)
    a, b = premise.beta_binomial_fit(k, 8)
    assert a == pytest.approx(0.6, rel=0.05) and b == pytest.approx(1.8, rel=0.05)
    assert premise.beta_binomial_fit(np.zeros(10), 8) is None  # never right: no spread to fit


# ---- the content-matched control -----------------------------------------------------------------

# as tests/test_options.py: a random model's answers, a third of them "right"
def parity(task, text, answer):
    return float(len(text) % 3 == 0)


def test_sft_replay_trains_on_exactly_the_entries_the_buffer_flushed_in_order(tmp_path,
                                                                              monkeypatch):
    """A disjoint run (MEF at --sft-cross 0, then RIEL with a small buffer) writes flushed.jsonl;
    --sft-replay on it trains one batch per flush on the very (prompt ids, target ids) the buffer
    handed to L_SFT, in flush order."""
    flushed = []
    take_all = train.HardExampleBuffer.take_all
    monkeypatch.setattr(train.HardExampleBuffer, "take_all",
                        lambda self, n=None: flushed.append(out := take_all(self, n)) or out)
    monkeypatch.setattr(train.verify, "reward", parity)
    common = ["--no-curves", "--testbed", "disjoint", "--train-size", "24", "--eval.size", "4",
              "--seed", "3"]
    run = tmp_path / "meml"
    train.main(train.cli(["--out-dir", str(run), *common, "--sft-cross", "0", "--mef.epochs", "1",
                          "--mef.stop-at", "None", "--riel.steps", "3",
                          "--riel.questions-per-step", "4", "--riel.group-size", "4",
                          "--riel.max-new-tokens", "8", "--riel.buffer-size", "3",
                          "--riel.buffer-k", "1", "--riel.buffer-flush", "exact",
                          "--eval-every", "0"]))
    entries = [e for batch in flushed for e in batch]
    assert len(flushed) >= 2 and all(len(b) == 3 for b in flushed)
    lines = [json.loads(x) for x in (run / "flushed.jsonl").read_text().splitlines()]
    assert [(x["question_id"], x["expert"]) for x in lines] == \
        [(e.question_id, e.expert) for e in entries]
    seen = []
    mef_steps = train.mef_steps
    monkeypatch.setattr(train, "mef_steps", lambda model, examples, *a, **k:
                        seen.extend(examples) or mef_steps(model, examples, *a, **k))
    ctl = tmp_path / "control"
    latest = run / (run / "latest").read_text().strip()
    train.main(train.cli(["--out-dir", str(ctl), *common, "--init", str(latest),
                          "--stages", "mef", "eval", "--sft-replay", str(run / "flushed.jsonl"),
                          "--mef.epochs", "1", "--mef.batch-size", "3", "--mef.stop-at", "None"]))
    assert [(e.prompt_ids, e.target_ids) for e in seen] == \
        [(e.prompt_ids, e.target_ids) for e in entries]
    steps = [json.loads(x) for x in (ctl / "metrics.jsonl").read_text().splitlines()]
    tokens = [m["tokens"] for m in steps if m.get("stage") == "mef"]
    # in flush order, not shuffled
    assert tokens == [sum(len(e.target_ids) for e in b) for b in flushed]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["sft_cross"] == 0.0 and "commit" in summary
    assert set(summary["evals"]["after_riel"]["accuracy_by_shape"]) == {"many", "long"}
    # the headline, recomputed from the answers in samples.jsonl: a question of two terms is
    # `long` (columns owns it), more terms `many` (chain's)
    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    answers = [a for x in lines if x.get("name") == "after_riel" for a in x["answers"]]
    owner = lambda q: "columns" if q.count("+") == 1 else "chain"  # noqa: E731
    unseen = [a["correct"] for a in answers if a["expert"] != owner(a["question"])]
    assert (summary["unseen_correct"], summary["unseen_total"]) == (sum(unseen), len(unseen))
    assert len(unseen) == 4 and summary["deployed"] in ("chain", "columns")
    mine = [a["correct"] for a in answers if a["expert"] == summary["deployed"]]
    assert summary["test_accuracy"] == pytest.approx(100 * sum(mine) / len(mine))
    # a buffer that never flushed: the control trains on nothing and keeps the weights it loaded
    empty, none = tmp_path / "none.jsonl", tmp_path / "control_none"
    empty.write_text("\n  \n")  # blank lines: no entry
    train.main(train.cli(["--out-dir", str(none), *common, "--init", str(latest),
                          "--stages", "mef", "eval", "--sft-replay", str(empty),
                          "--mef.stop-at", "None"]))
    steps = [json.loads(x) for x in (none / "metrics.jsonl").read_text().splitlines()]
    assert not [m for m in steps if m.get("stage") == "mef"]
    got = load_file(str(none / (none / "latest").read_text().strip() / "model.safetensors"))
    want = load_file(str(latest / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "after_mef" in json.loads((none / "summary.json").read_text())["evals"]
    bad = tmp_path / "bad.jsonl"  # an entry of no question of this run: refused at its line
    good = (run / "flushed.jsonl").read_text().splitlines()[0]
    bad.write_text(good + '\n{"question_id": 5, "expert": "chain"}\n')
    with pytest.raises(UserError, match=f"{bad}:2: .* names no question / expert"):
        train.main(train.cli(["--out-dir", str(tmp_path / "bad"), *common, "--init", str(latest),
                              "--stages", "mef", "eval", "--sft-replay", str(bad)]))


# ---- the dose grid -------------------------------------------------------------------------------

def test_dose_response_quick_writes_the_contrast_per_dose(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "experiments"))
    import dose_response as dr
    cfg = dr.Config(out_dir=str(tmp_path / "runs"), out=str(tmp_path / "dose.json"), quick=True)
    dr.main(cfg)
    out = json.loads((tmp_path / "dose.json").read_text())
    assert set(out["grid"]) == {"0"}  # --quick: the first dose
    for p, res in out["grid"].items():
        assert set(res) == {"MoE-SFT", dr.ALONE, dr.WITH_T, "MEML-GRPO", dr.CONTROL}
        for row, runs in res.items():
            assert (runs["0"]["sft_cross"] == float(p)
                    and set(runs["0"]["by_shape"]) == {"many", "long"})
        assert {"taught_deployed", "rescued_deployed", "nulls"} <= \
            set(res["MoE-SFT"]["0"]["pre_rl"])
        assert ("start" in res[dr.WITH_T]["0"]["taught_deployed"]
                and res[dr.WITH_T]["0"]["term_scale"] == "step")
    assert "The transfer alone" in (tmp_path / "dose.md").read_text()
    assert (tmp_path / "dose.png").stat().st_size > 10_000
