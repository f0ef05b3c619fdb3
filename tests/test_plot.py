"""curves.py, through experiments/plot.py (its command line): what it reads from metrics.jsonl,
overlaying runs, the command line, and life without matplotlib. The runs here are written by hand
(fast); tests/test_cli.py plots a real train.py run."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
from plumbing import runlog
from experiments import plot
from losses import CORRECT
from plumbing.premise import step_metrics

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = data.experts("synthetic")  # chain, columns, reverse


def fake_run(path: Path, seed=0, mef_steps=6, rl_steps=12, flush_every=4):
    """A run directory whose metrics.jsonl has train.py's records: RIEL's per-expert keys come from
    premise.step_metrics itself, so a renamed key breaks this test, not just the picture."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"stage": "mef", "step": i, "gstep": i, "loss": 5.0 / i}
            for i in range(1, mef_steps + 1)]
    rows.append({"stage": "eval", "name": "after_mef", "gstep": mef_steps, "majority_vote": 0.25,
                 "accuracy": {"chain": 0.1, "columns": 0.2, "reverse": 0.05}})
    for i in range(1, rl_steps + 1):
        rewards = (torch.rand(4, len(EXPERTS), 8, generator=g) < 0.3).float()
        flushed = 3 if i % flush_every == 0 else 0
        rows.append({"stage": "riel", "step": i, "gstep": mef_steps + i,
                     **step_metrics(rewards, EXPERTS, [], correct=CORRECT),
                     "loss_grpo": 0.01 * i, "loss_transfer": 0.5,
                     "loss_sft": 2.0 if flushed else 0.0, "flushed": flushed,
                     "completions/mean_length": 10.0 + i, "entropy": 3.0 - 0.1 * i,
                     "grad_share/grpo": 0.5, "grad_share/sft": 0.5 if flushed else 0.0})
        if i % 6 == 0:  # --eval-every 6
            rows.append({"stage": "eval_riel", "step": i, "gstep": mef_steps + i, "questions": 20,
                         "best_accuracy": 0.1 * i, "majority_vote": 0.05 * i,
                         "accuracy": {"chain": 0.1 * i, "columns": 0.0, "reverse": 0.0}})
    rows.append({"stage": "eval", "name": "after_riel", "gstep": mef_steps + rl_steps,
                 "majority_vote": 0.4, "accuracy": {"chain": 0.3, "columns": 0.25, "reverse": 0.1}})
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_smooth_is_a_trailing_moving_mean():
    xs = torch.rand(50, generator=torch.Generator().manual_seed(0)).tolist()
    for k in (1, 3, 7, 80):
        ref = [statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]
        assert plot.smooth(xs, k) == pytest.approx(ref, abs=1e-12)


def test_curves_are_the_logged_metrics(tmp_path):
    rows = fake_run(tmp_path / "run")
    rl = [r for r in rows if r["stage"] == "riel"]
    c = plot.curves(plot.read_metrics(str(tmp_path / "run")), window=3)
    smoothed = lambda key: pytest.approx(plot.smooth([r[key] for r in rl], 3))
    assert list(c["reward"]) == ["chain", "columns", "reverse", "all experts"]
    xs, ys = c["reward"]["columns"]
    assert xs == list(range(1, 13)) and ys == smoothed("reward/columns")
    assert c["zero_spread"]["all experts"][1] == smoothed("zero_spread")
    assert c["riel_loss"]["L_SFT"] == ([4, 8, 12], [2.0, 2.0, 2.0])  # only where the buffer flushed
    assert c["accuracy"]["chain"] == ([6, 18], [0.1, 0.3])
    assert c["accuracy"]["majority vote"] == ([6, 18], [0.25, 0.4])
    assert c["mef_loss"]["loss"][0] == list(range(1, 7))
    assert c["premise"]["rescued/reverse"][1] == smoothed("rescued/reverse")
    assert c["premise"]["rescue rate"][1] == smoothed("rescue_rate")
    assert c["grad_share"]["sft"][1] == smoothed("grad_share/sft")
    assert c["completions"]["entropy"][1] == smoothed("entropy")
    assert c["completions"]["tokens"][1] == smoothed("completions/mean_length")
    assert c["riel_loss"]["L_transfer"][1] == pytest.approx([0.5] * 12)
    best = c["accuracy"]["best expert, 20 q (every 6 steps)"]
    assert best == ([12, 18], pytest.approx([0.6, 1.2]))
    assert c["accuracy"]["vote, 20 q"] == ([12, 18], pytest.approx([0.3, 0.6]))
    # no RIEL stage (an SFT-only run): those panels are empty, the others drawn
    sft_only = plot.curves([r for r in rows if r["stage"] not in ("riel", "eval_riel")])
    assert not sft_only["reward"]
    assert list(sft_only["accuracy"]) == ["chain", "columns", "reverse", "majority vote"]


def test_two_runs_overlay_with_a_legend(tmp_path):
    pytest.importorskip("matplotlib")
    fake_run(tmp_path / "a", seed=0)
    fake_run(tmp_path / "b", seed=1)
    out = plot.plot_runs([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "both.png"),
                         labels=["a", "b"])
    assert out and os.path.getsize(out) > 20_000
    plt = plot.pyplot("test")
    runs = [plot.curves(plot.read_metrics(str(tmp_path / d))) for d in "ab"]
    fig = plot.figure(plt, runs, ["a", "b"])
    reward_ax = fig.axes[0]
    legend = set(reward_ax.get_legend_handles_labels()[1])
    assert {"a: chain", "b: chain", "a: all experts", "b: all experts"} <= legend
    # same expert, same line style; different runs, different colours
    lines = {line.get_label(): line for line in reward_ax.lines}
    assert lines["a: chain"].get_linestyle() == lines["b: chain"].get_linestyle()
    assert lines["a: chain"].get_color() != lines["b: chain"].get_color()
    plt.close(fig)


def test_command_line_overlays_runs_and_names_a_wrong_directory(tmp_path):
    pytest.importorskip("matplotlib")
    fake_run(tmp_path / "a", seed=0)
    fake_run(tmp_path / "b", seed=1)
    cmd = [sys.executable, "-m", "experiments.plot"]
    args = [str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]
    ok = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "c.png").stat().st_size > 20_000
    bad = subprocess.run(cmd + [str(tmp_path / "nope")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ")
    assert "nope" in bad.stderr and "metrics.jsonl" in bad.stderr


def test_without_matplotlib_one_line_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "run")
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.plot_runs([str(tmp_path / "run")], str(tmp_path / "run" / "curves.png")) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "pip install matplotlib" in out[0]
    assert not (tmp_path / "run" / "curves.png").exists()


def test_a_failed_picture_never_fails_the_run(tmp_path, capsys):
    # no metrics.jsonl here: plot_runs raises, write_curves warns
    runlog.write_curves(str(tmp_path))
    assert "warning: curves.png not written" in capsys.readouterr().err
