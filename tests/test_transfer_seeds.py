"""experiments/transfer_seeds.py: the argv templates a reader fills in parse into the rows they
name (transfer only and no transfer differ in the transfer alone, at one lr), the choice is
required, and the contrasts are what hand-made runs give, recomputed here."""
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import transfer_seeds as st  # noqa: E402
import train  # noqa: E402

CHOICE = {"setting": "step 0.3", "lr": {st.T_ONLY: 1e-4, st.MEML: 3e-4, st.GRPO: 3e-5},
          "chosen_on": [100, 101], "prediction": "no collapse"}


def filled(row, seed=7):
    args = st.argv(st.Config(), row, CHOICE)
    return train.cli([a.format(seed=seed, out="/tmp/o", init="start", expert="columns")
                      for a in args])


def test_the_templates_parse_into_their_rows_and_differ_where_they_should():
    t, n = filled(st.T_ONLY), filled(st.NO_T)
    assert (t.seed, t.out_dir, t.init, t.testbed, t.sft_cross) == (7, "/tmp/o", "start",
                                                                   "disjoint", 0.0)
    assert (t.riel.term_scale, t.riel.lambda1, t.riel.lr, t.riel.buffer) == ("step", 0.3, 1e-4,
                                                                             False)
    # the transfer alone: every other option equal, the lr included
    diff = {k for k, v in dataclasses.asdict(t.riel).items() if dataclasses.asdict(n.riel)[k] != v}
    assert diff == {"transfer"} and t.riel.transfer and dataclasses.replace(t, riel=n.riel) == n
    m, g = filled(st.MEML), filled(st.GRPO)
    assert m.riel.buffer and m.riel.transfer and m.riel.lr == 3e-4
    assert g.riel.advantage == "grpo" and g.experts == ("columns",) and g.riel.lr == 3e-5
    assert g.riel.questions_per_step == 2 * t.riel.questions_per_step  # N x the questions
    sft = filled(st.fa.SFT)
    assert sft.stages == ("mef", "eval") and sft.init is None and sft.seed == 7


def test_the_json_names_the_chosen_setting_as_train_py_parses_it():
    c = st.chosen(st.Config(), CHOICE)
    assert (c["term_scale"], c["lambda1"], c["lr"]["transfer only"]) == ("step", 0.3, 1e-4)
    assert c["chosen_on"] == [100, 101] and c["transfer_mode"] == "sampled"
    assert c["setting"] == "step 0.3" and c["transfer_cap"] == train.cli([]).riel.transfer_cap


def test_a_missing_or_incomplete_choice_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="missing"):
        st.main(st.Config(choice=str(tmp_path / "none.json"), out_dir=str(tmp_path / "r")))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"setting": "step 9", "lr": {}}))
    with pytest.raises(SystemExit, match="needs setting"):
        st.main(st.Config(choice=str(bad), out_dir=str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def run(row, seed, test, unseen, testbed="disjoint@0"):
    return {"row": row, "seed": seed, "testbed": testbed, "test": test, "start_test": 30.0,
            "unseen_correct": unseen, "unseen_total": 300, "collapsed": False}


def test_contrasts_pair_by_seed_test_fisher_per_seed_and_holm_across():
    runs = [run(st.T_ONLY, s, 40.0 + s, 40 + 10 * s) for s in range(3)]
    runs += [run(st.NO_T, s, 35.0, 2) for s in range(3)]
    runs += [run(st.NO_T, 9, 20.0, 0)]  # no partner: left out of every pair
    c = st.contrasts(runs)["disjoint@0: transfer only - no transfer"]
    assert c["seeds"] == [0, 1, 2] and c["mean"] == pytest.approx(6.0)  # 5, 6, 7
    assert c["p_sign_flip"] == pytest.approx(2 / 8)  # all positive: 2 of the 8 patterns
    assert c["fisher_p"][0] == pytest.approx(st.fisher_greater(40, 300, 2, 300))
    assert c["seeds_p_below_0.01"] == 3
    assert c["p_holm"] == pytest.approx(min(1.0, 2 / 8))  # the only contrast: Holm changes nothing
    assert c["ci95"] == pytest.approx(4.303 * 1.0 / 3 ** 0.5)  # t_{0.975,2} * sd / sqrt(n)


def test_each_run_names_the_cpu_kind_that_made_it_and_the_table_says_it_per_seed(tmp_path):
    # a seed is a draw per CPU kind: runs before machine.txt was kept are the first study's kind
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "machine.txt").write_text("Intel Xeon\n")
    assert st.run_machine(str(tmp_path / "new")) == "Intel Xeon"
    assert st.run_machine(str(tmp_path)) == st.FIRST_MACHINE
    runs = [{**run(st.T_ONLY, s, 50.0, 100), "machine": m}
            for s, m in ((0, "AMD EPYC"), (1, "AMD EPYC"), (2, "Intel Xeon"))]
    doc = {"commit": "abc", "machine": ["AMD EPYC", "Intel Xeon"], "runs": runs,
           "chosen": {"setting": "step 0.3", "chosen_on": [100]}, "contrasts": {}}
    row = next(ln for ln in st.markdown(doc).splitlines() if "| transfer only |" in ln)
    assert row.endswith("| AMD EPYC: 0 1; Intel Xeon: 2 |")


def test_regenerate_moves_in_a_retrained_checkpoint_only_when_its_hash_matches(tmp_path,
                                                                              monkeypatch):
    """A committed run keeps summary.json and weights.sha256, not its weights: --regenerate
    trains it again beside it (here a stand-in writes the weights) and checks the hash."""
    cfg = st.Config(out_dir=str(tmp_path))
    sft = Path(st.fa.run_dir(cfg, "disjoint@0", st.fa.SFT, 4))
    out = Path(st.fa.run_dir(cfg, "disjoint@0", st.T_ONLY, 4))
    sft.mkdir(parents=True)
    (sft / "summary.json").write_text(json.dumps(
        {"evals": {"after_mef@val": {"accuracy": {"chain": 0.1, "columns": 0.2}}}}))
    (sft / "latest").write_text("ckpt-000001\n")
    out.mkdir(parents=True)
    (out / "summary.json").write_text(json.dumps({"commit": "abc"}))
    monkeypatch.setattr(st.fa, "run_sft", lambda *a: None)
    weights, seen = [b"W1"], []

    def retrain(args, side, threads, name):  # the run, deterministic: the same bytes each time
        seen.append(args)
        ckpt = Path(side) / "ckpt-000150"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(weights[0])
        (Path(side) / "latest").write_text("ckpt-000150\n")
        (Path(side) / "summary.json").write_text("{}")
    monkeypatch.setattr(st, "launch", retrain)
    (out / "weights.sha256").write_text(hashlib.sha256(b"W1").hexdigest() + "\n")
    path = st.regenerate(cfg, CHOICE, "disjoint@0", st.T_ONLY, "4")
    assert Path(path) == out / "ckpt-000150" and (out / "latest").read_text().strip() == path[-11:]
    assert "--init" in seen[0] and str(sft / "ckpt-000001") in seen[0]
    assert st.regenerate(cfg, CHOICE, "disjoint@0", st.T_ONLY, "4") == path and len(seen) == 1
    # another machine's weights: refused, nothing moved in
    other = Path(st.fa.run_dir(cfg, "disjoint@0", st.NO_T, 4))
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps({"commit": "abc"}))
    (other / "weights.sha256").write_text(hashlib.sha256(b"W1").hexdigest() + "\n")
    weights[0] = b"W2"
    with pytest.raises(SystemExit, match="differ"):
        st.regenerate(cfg, CHOICE, "disjoint@0", st.NO_T, "4")
    assert not (other / "latest").exists()
