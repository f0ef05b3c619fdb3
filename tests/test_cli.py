"""train.py's command line: a user's mistake ends with its message alone and exit status 2, a bug
keeps its traceback; a step line every --log-every steps (every step still in metrics.jsonl);
curves.png after a run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plumbing import runlog
import train
from test_train import SMALL

ROOT = Path(__file__).resolve().parents[1]

# (arguments, extra environment, what the message must say): the user's mistakes of issue 14
MISTAKES = {
    "unknown model": (["--model", "nosuchmodel"], {}, ["unknown model 'nosuchmodel'", "tiny"]),
    "unknown task": (["--data", "nosuchtask"], {}, ["unknown task 'nosuchtask'", "gsm8k"]),
    "missing data file": (["--data", "gsm8k", "--data-dir", "/nonexistent"], {},
                          ["missing data file /nonexistent/gsm8k/train.jsonl",
                           "python -m data download gsm8k"]),
    # (GSM8K's files in place: guard checks the data files before any model loads)
    "uncached hub model offline": (["--model", "someorg/somemodel", "--data-dir", "{data}"],
                                   {"HF_HUB_OFFLINE": "1"},
                                   ["someorg/somemodel", "HF_HUB_OFFLINE=1"]),
}
# a bug: data.experts raising a plain ValueError (not a UserError) inside main
INJECTED_BUG = ("import runpy, sys, data\n"
                "def experts(*a, **k): raise ValueError('injected bug')\n"
                "data.experts = experts\n"
                "sys.argv = ['train.py'] + sys.argv[1:]\n"
                "runpy.run_path('train.py', run_name='__main__')\n")


def test_user_mistakes_end_with_the_message_alone_and_a_bug_keeps_its_traceback(tmp_path):
    # an empty hub cache
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    for split in ("train", "test"):
        (tmp_path / "data" / "gsm8k" / f"{split}.jsonl").write_text("")

    def start(name, cmd, extra_env):
        cmd = [a.replace("{data}", str(tmp_path / "data")) for a in cmd]
        return subprocess.Popen([sys.executable, *cmd, "--out-dir", str(tmp_path / name)], cwd=ROOT,
                                env={**env, **extra_env}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    # all at once: each spends its few seconds importing torch
    procs = {name: start(name, ["train.py", *args], extra)
             for name, (args, extra, _) in MISTAKES.items()}
    bug = start("bug", ["-c", INJECTED_BUG], {})
    for name, (_, _, says) in MISTAKES.items():
        _, err = procs[name].communicate(timeout=300)
        assert procs[name].returncode == 2, (name, err)
        assert "Traceback" not in err and err.startswith("error: "), (name, err)
        for text in says:
            assert text in err, (name, text, err)
    _, err = bug.communicate(timeout=300)
    assert (bug.returncode == 1 and "Traceback" in err
            and err.strip().endswith("ValueError: injected bug")), err


def test_step_lines_every_n_steps_hold_the_means_since_the_previous_line():
    lines = runlog.StepLines(log_every=None, start=0, total=400)
    printed = [s for s in range(1, 401) if lines(s, {"step": s, "loss": float(s), "lr": 0.1 * s})]
    assert printed == [1] + list(range(20, 401, 20))  # the default RIEL stage: 21 lines, not 400
    lines = runlog.StepLines(log_every=None, start=0, total=282)  # the default MEF stage
    # 1, 15, 30, ..., 270, 282
    assert sum(lines(s, {"loss": 1.0}) is not None for s in range(1, 283)) == 20
    lines = runlog.StepLines(log_every=4, start=5, total=14)  # resumed after step 5
    got = {s: lines(s, {"step": s, "loss": float(s), "lr": 0.1 * s}) for s in range(6, 15)}
    assert [s for s, a in got.items() if a] == [6, 8, 12, 14]
    # mean; current
    assert got[12]["loss"] == (9 + 10 + 11 + 12) / 4 and got[12]["lr"] == pytest.approx(1.2)
    assert got[14]["loss"] == (13 + 14) / 2


def test_log_every_prints_a_few_lines_keeps_every_step_and_draws_the_curves(tmp_path, capsys):
    # 8 MEF, 4 RIEL steps
    train.main(train.cli(["--out-dir", str(tmp_path), *SMALL, "--log-every", "3", "--curves"]))
    out = capsys.readouterr().out.splitlines()
    assert ([line.split()[1] for line in out if line.startswith("mef ")]
            == ["1/8", "3/8", "6/8", "8/8"])
    assert [line.split()[1] for line in out if line.startswith("riel ")] == ["1/4", "3/4", "4/4"]
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["gstep"] for m in logged if m["stage"] in ("mef", "riel")] == list(range(1, 13))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert any("pip install matplotlib" in line for line in out)
        return
    assert (tmp_path / "curves.png").stat().st_size > 20_000
    # after MEF, at the end
    assert sum(line == f"curves -> {tmp_path / 'curves.png'}" for line in out) == 2


def test_a_directory_that_is_not_a_checkpoint_is_a_user_error(tmp_path):
    from plumbing import presets
    with pytest.raises(presets.UserError, match="no config.json"):
        presets.resolve_checkpoint(str(tmp_path))
