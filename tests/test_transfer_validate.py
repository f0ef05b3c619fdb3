"""experiments/transfer_validate.py: every setting's argument list parses into the configuration it
names, and a run's record (collapse, unseen-shape gain, the transfer's early share, own-shape
accuracy) is what hand-made run directories say, computed here the naive way."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import transfer_validate as tv  # noqa: E402
import train  # noqa: E402


@pytest.mark.parametrize("setting", list(tv.SETTINGS))
def test_each_setting_is_the_transfer_only_row_with_its_own_options(setting, tmp_path,
                                                                     monkeypatch):
    cfg = tv.Config(out_dir=str(tmp_path))
    monkeypatch.setattr(tv.fa, "final_ckpt", lambda out: "start-ckpt")
    args = tv.rl_args(cfg, setting, 101, str(tmp_path / "run"))
    c = train.cli(args)
    r = c.riel
    assert (c.testbed, c.sft_cross, c.seed, c.init) == ("disjoint", 0.0, 101, "start-ckpt")
    assert not r.buffer and r.grad_shares and r.steps == cfg.steps
    assert r.transfer == (setting != "none")
    words = setting.split()
    if setting != "none":  # "<term scale> <lambda1> [lever]"
        assert (r.term_scale, r.lambda1) == (words[0], float(words[1]))
    assert r.lr == (3e-5 if "lr 3e-5" in setting else cfg.lr)
    assert r.transfer_mode == ("full_vocab" if "full-vocab" in setting else "sampled")
    assert r.kl_beta == (0.04 if setting.endswith("kl") else 0.0)
    assert r.grad_clip == (0.3 if "clip 0.3" in setting else 1.0)
    assert r.lambda1_warmup == (50 if "warm 50" in setting else 0)
    assert r.transfer_cap == (0.5 if "cap 0.5" in setting else None)


def summary(path, stage, test_val, by_shape, unseen):
    """A summary.json: test and validation accuracy per expert, per shape, the unseen counts."""
    ev = {stage: {"accuracy": test_val[0], "accuracy_by_shape": by_shape,
                  "unseen": {"correct": unseen, "total": 300}},
          f"{stage}@val": {"accuracy": test_val[1]}}
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({"evals": ev, "commit": "abc"}))


def test_a_run_record_from_hand_made_runs(tmp_path):
    cfg = tv.Config(out_dir=str(tmp_path), seeds=(100,), settings=("step 1",))
    sft = Path(tv.sft_dir(cfg, 100))
    run = Path(tv.run_dir(cfg, "step 1", 100))
    summary(sft, "after_mef", ({"chain": 0.40, "columns": 0.30}, {"chain": 0.2, "columns": 0.5}),
            {"many": {"chain": 0.7, "columns": 0.0}, "long": {"chain": 0.0, "columns": 0.6}}, 1)
    # columns is deployed at the start (best on val): 30.0; after RL chain is: 24.0 < 30 - 5
    summary(run, "after_riel", ({"chain": 0.24, "columns": 0.10}, {"chain": 0.3, "columns": 0.1}),
            {"many": {"chain": 0.4, "columns": 0.1}, "long": {"chain": 0.08, "columns": 0.1}}, 31)
    norms = [{"grad_norm/grpo": 1.0, "grad_norm/transfer": 3.0, "grad_norm/sft": 0.0,
              "reward/chain": 0.1 * i, "reward/columns": 0.2, "taught/chain": 0.5,
              "taught/columns": 0.25} for i in range(30)]
    norms[0]["grad_norm/transfer"] = 1.0  # shares: 0.5 once, then 0.75 for 19 of the first 20
    (run / "curves.json").write_text(json.dumps(norms))
    rec = tv.numbers(cfg, "step 1", 100)
    assert (rec["start_test"], rec["test"], rec["deployed"]) == (30.0, 24.0, "chain")
    assert rec["collapsed"] and (rec["start_unseen_correct"], rec["unseen_correct"]) == (1, 31)
    assert rec["transfer_share_early"] == pytest.approx((0.5 + 19 * 0.75) / 20)
    # own shapes: chain owns `many`, columns owns `long`
    assert rec["own_shape"] == {"start": {"chain": 70.0, "columns": 60.0},
                                "end": {"chain": 40.0, "columns": 10.0}}
    assert rec["reward"]["chain"]["start"] == pytest.approx(0.1)  # steps 0-2: 0, 0.1, 0.2
    s = tv.summarize([rec, {**rec, "seed": 101, "test": 25.1, "collapsed": False,
                            "unseen_correct": 11}])
    assert s["step 1"]["collapses"] == 1 and s["step 1"]["collapsed_seeds"] == [100]
    assert s["step 1"]["unseen_gain_mean"] == pytest.approx(((31 - 1) + (11 - 1)) / 2)
    assert "**collapsed**" in tv.markdown(cfg, [rec], s)


def test_unknown_settings_are_named_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="unknown settings"):
        tv.main(tv.Config(out_dir=str(tmp_path), settings=("step 2",)))
    assert not any(tmp_path.iterdir())
