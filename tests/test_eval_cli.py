"""`python eval.py --model <a train.py checkpoint>` evaluates what the run evaluated, and its
options change that."""

import json
import shutil

import eval as ev
import train
from test_train import SMALL


def spy_on_evaluate(monkeypatch, module, calls):
    """Record what `module` hands evaluate: a run this short scores 0 everywhere, so equal tables
    alone would prove little; equal records, experts, settings and seed on the same weights do."""
    real = module.evaluate

    # kw: keep_texts (what goes to samples.jsonl)
    def spy(model, tok, task, records, experts, cfg, seed=0, **kw):
        calls.append((task, records, experts, cfg, seed))
        return real(model, tok, task, records, experts, cfg, seed, **kw)
    monkeypatch.setattr(module, "evaluate", spy)


def test_eval_py_on_a_runs_checkpoint_reproduces_the_runs_own_tables(tmp_path, capsys,
                                                                     monkeypatch):
    # no defaults anywhere: testbed (other experts), seed, levels 2-3 (the task's: 1-3), a 2nd split
    out, run_calls, eval_calls = tmp_path / "run", [], []
    spy_on_evaluate(monkeypatch, train, run_calls)
    train.main(train.cli(["--out-dir", str(out), *SMALL, "--testbed", "placebo", "--seed", "3",
                          "--eval-splits", "val"]))
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    spy_on_evaluate(monkeypatch, ev, eval_calls)
    tables = ev.main(ev.cli(["--model", summary["checkpoint"]]))
    assert eval_calls == run_calls[-2:]  # after_riel, after_riel@val
    assert tables == {"test": summary["evals"]["after_riel"],
                      "val": summary["evals"]["after_riel@val"]}
    assert ("eval: synthetic, testbed placebo, levels 2-3, split test, 8 questions, "
            "experts alpha, beta, gamma" in capsys.readouterr().out)

    # train.py's option names override the run's settings
    a = ev.cli(["--model", summary["checkpoint"], "--eval.size", "5", "--eval-splits",
                "--rl-difficulty", "1", "1"])
    settings = (a.eval.size, a.eval_splits, a.difficulty, a.testbed, a.seed)
    assert settings == (5, (), (1, 1), "placebo", 3)
    tables = ev.main(a)
    assert list(tables) == ["test"] and tables["test"]["questions"] == 5
    assert {r.meta["difficulty"] for r in eval_calls[-1][1]} == {1}
    assert "testbed placebo, levels 1-1, split test, 5 questions" in capsys.readouterr().out

    # a directory without the run's settings (a plain HF model): eval.py's own defaults, and a note
    plain = tmp_path / "plain"
    shutil.copytree(summary["checkpoint"], plain, ignore=shutil.ignore_patterns("trainer_state.pt"))
    a = ev.cli(["--model", str(plain)])
    assert a == ev.Args(model=str(plain))
    assert "holds no train.py trainer state" in capsys.readouterr().out


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import pytest
    from plumbing.errors import UserError
    monkeypatch.setattr(ev.Transformer, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model loaded first"))
    (tmp_path / "a_file").write_text("x")
    for out in ("/nonexistent/dir/x.json", str(tmp_path / "a_file" / "x.json"), str(tmp_path)):
        with pytest.raises(UserError, match=f"--out {out} "):
            ev.main(ev.Args(model="tiny", out=out))
