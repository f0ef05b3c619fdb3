"""A run never loses its work and never silently lies (issue 30): bad options refused before
anything loads, resume refusing what it cannot continue, the run lock, non-finite guards, damaged
checkpoints named with their fallback, a half-written metrics line repaired, and faults injected at
every file-system boundary of a save (a kill after each rename/replace/rmtree, a full disk in each
write), each resumed and compared with an uninterrupted run."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plumbing import checkpoint
from plumbing import guard, process
import train
from conftest import wait_for_checkpoint
from plumbing.errors import UserError
from test_train import SMALL, run, weights

ROOT = Path(__file__).resolve().parents[1]


def last(out):
    return checkpoint.latest(str(out))


# ---- options: refused before any model or data loads ---------------------------------------------

BAD = [["--riel.steps", "0"], ["--train-size", "0"], ["--eval.size", "0"],
       ["--riel.group-size", "1"], ["--riel.lr", "0"], ["--riel.lr", "-1e-4"],
       ["--mef.lr", "nan"], ["--mef.lr", "inf"], ["--riel.questions-per-step", "0"],
       ["--eval.batch-size", "0"], ["--eval-every-size", "0"], ["--checkpoint-every", "0"],
       ["--mef.batch-size", "0"], ["--mef.micro-batch-size", "0"], ["--mef.check-every", "0"],
       ["--riel.max-new-tokens", "0"], ["--difficulty", "5", "1"], ["--lora-rank", "-3"],
       ["--riel.buffer-k", "8"], ["--trace-file", "/nonexistent/teacher.jsonl"],
       ["--mef.warmup-steps", "-5"], ["--riel.warmup-steps", "-1"],
       ["--seed", "99999999999999999999"], ["--seed", "-1"], ["--riel.top-p", "0"],
       ["--riel.top-p", "1.5"], ["--riel.clip-eps", "-0.1"], ["--lora-alpha", "0"]]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_a_bad_option_is_one_clear_error_before_anything_loads(tmp_path, monkeypatch, args):
    monkeypatch.setattr(train.data, "load",
                        lambda *a, **k: pytest.fail("data loaded before the options were checked"))
    monkeypatch.setattr(train.Transformer, "from_config",
                        lambda *a, **k: pytest.fail("model built first"))
    with pytest.raises(UserError, match=args[0].lstrip("-").split(".")[-1].replace("_", "-")):
        train.main(train.cli(["--out-dir", str(tmp_path / "run"), *args]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_command_line_exits_2_with_one_line_for_a_user_error(tmp_path):
    p = subprocess.run([sys.executable, "train.py", "--out-dir", str(tmp_path / "x"),
                        "--riel.steps", "0"], cwd=ROOT, capture_output=True, text=True)
    assert (p.returncode == 2 and p.stderr.strip().count("\n") == 0
            and p.stderr.startswith("error: --riel.steps 0"))


def test_an_out_dir_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(train.Transformer, "from_config",
                        lambda *a, **k: pytest.fail("model built first"))
    with pytest.raises(UserError, match="cannot be written"):
        train.main(train.cli(["--out-dir", str(tmp_path / "a_file" / "run")]))


# ---- resume --------------------------------------------------------------------------------------

def test_resume_without_a_checkpoint_is_refused_and_deletes_nothing(tmp_path):
    out = tmp_path / "typo"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "mef", "gstep": 1}\n')
    with pytest.raises(UserError, match="no complete checkpoint"):
        run(out, "--resume")
    assert (out / "metrics.jsonl").read_text() == '{"stage": "mef", "gstep": 1}\n'
    # asked for: starts afresh
    run(out, "--resume", "--resume-or-start", "--stages", "mef", "--riel.steps", "1")
    assert last(out) is not None


def test_resume_refuses_a_change_of_what_the_run_computes_and_records_an_allowed_one(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--checkpoint-every", "1", "--stages", "mef", "riel")
    from test_train import killed_after_checkpoint
    killed_after_checkpoint(monkeypatch, lambda: run(out, *args), gstep=9)
    for change in (["--seed", "3"], ["--testbed", "placebo"], ["--riel.group-size", "8"],
                   ["--experts", "chain"], ["--riel.advantage", "grpo"]):
        with pytest.raises(UserError, match="would change what this run computes"):
            run(out, "--resume", *args, *change)
    run(out, "--resume", *args, "--log-every", "1")  # logging only: free
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume_changes"] == []
    with pytest.raises(UserError, match="riel.steps 4 -> 3"):  # fewer steps than it took: refused
        run(out, "--resume", *args, "--riel.steps", "3")


def test_an_allowed_change_is_recorded_with_the_step_it_took_effect(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--checkpoint-every", "1", "--stages", "mef", "riel")
    from test_train import killed_after_checkpoint
    killed_after_checkpoint(monkeypatch, lambda: run(out, *args), gstep=9)
    run(out, "--resume", *args, "--riel.lr", "5e-4", "--resume-allow-change", "riel.lr")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume_changes"] == [{"gstep": 9, "changes": [["riel.lr", 1e-3, 5e-4]]}]
    assert summary["config"]["riel"]["lr"] == 5e-4


def test_a_half_written_last_metrics_line_is_dropped_and_a_damaged_middle_one_named(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("--checkpoint-every", "1", "--stages", "mef")
    from test_train import killed_after_checkpoint
    killed_after_checkpoint(monkeypatch, lambda: run(out, *args), gstep=5)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "mef", "gst')  # a full disk mid-line
    run(out, "--resume", *args)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["gstep"] for m in lines if m["stage"] == "mef"] == list(range(1, 9))
    text = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(text[:2] + ["garbage"] + text[2:]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:3"):
        train.runlog.MetricsLog(str(out / "metrics.jsonl"), 5)


# ---- the lock ------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    held = process.RunLock(str(tmp_path)).acquire()
    with pytest.raises(UserError, match="in use by process"):
        run(tmp_path, "--stages", "mef")
    held.release()
    assert not (tmp_path / "run.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run.lock").write_text(f"{dead.pid} {os.uname().nodename}")
    with pytest.warns(UserWarning, match="no longer running"):
        process.RunLock(str(tmp_path)).acquire().release()


# ---- non-finite numbers never reach a checkpoint -------------------------------------------------

def test_non_finite_weights_are_never_saved_nor_resumed(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_step = train.mef_steps

    def poisoned(model, *a, **k):
        for m in real_step(model, *a, **k):
            if m["step"] == 3:
                with torch.no_grad():
                    model.lm_head.weight[0, 0] = float("nan")
            yield m
    monkeypatch.setattr(train, "mef_steps", poisoned)
    # (lm_head and embed_tokens are tied: one tensor)
    with pytest.raises(UserError, match="(lm_head|embed_tokens).weight is NaN or inf"):
        run(out, "--checkpoint-every", "1", "--stages", "mef")
    assert last(out).endswith("ckpt-000002")  # the last finite one stays the latest
    # a checkpoint poisoned on disk is refused when loaded, naming the tensor
    from safetensors.torch import load_file, save_file
    path = Path(last(out)) / "model.safetensors"
    w = load_file(path)
    w["model.norm.weight"][0] = float("inf")
    save_file(w, path, metadata={"format": "pt"})
    monkeypatch.setattr(train, "mef_steps", real_step)
    with pytest.raises(UserError, match="model.norm.weight|norm.weight"):
        run(out, "--resume", "--checkpoint-every", "1", "--stages", "mef")


def test_skipped_steps_are_counted_and_a_streak_stops_the_run_naming_the_lr(tmp_path, monkeypatch):
    real = train.mef_steps

    def some_skipped(*a, **k):
        for m in real(*a, **k):
            yield {**m, "skipped": m["step"] in (2, 4)}
    monkeypatch.setattr(train, "mef_steps", some_skipped)
    run(tmp_path / "a", "--stages", "mef")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["optimizer_steps"] == 6
    monkeypatch.setattr(train, "mef_steps",
                        lambda *a, **k: ({**m, "skipped": m["step"] > 1} for m in real(*a, **k)))
    with pytest.raises(UserError, match=r"in a row.*--mef.lr"):
        run(tmp_path / "b", "--stages", "mef")


def test_an_entropy_collapse_with_falling_reward_warns_once_naming_the_lr(capsys):
    state = {}
    for reward in (0.5, 0.4, 0.3, 0.3, 0.2, 0.1, 0.1):
        guard.warn_collapse(state, {"entropy": 0.01, "reward": reward}, 0.5)
    assert capsys.readouterr().out.count("--riel.lr 0.5") == 1


# ---- damaged checkpoints -------------------------------------------------------------------------

DAMAGE = {
    "truncated weights": lambda c: (c / "model.safetensors").write_bytes(
        (c / "model.safetensors").read_bytes()[:-100]),
    "empty weights": lambda c: (c / "model.safetensors").write_bytes(b""),
    "deleted weights": lambda c: (c / "model.safetensors").unlink(),
    "truncated trainer state": lambda c: (c / "trainer_state.pt").write_bytes(
        (c / "trainer_state.pt").read_bytes()[:50]),
    "deleted tokenizer": lambda c: (c / "tokenizer.json").unlink(),
    "garbage config": lambda c: (c / "config.json").write_text("{\n"),
    "config with an extra layer": lambda c: (c / "config.json").write_text(json.dumps(
        {**(cfg := json.loads((c / "config.json").read_text())),
         "num_hidden_layers": cfg["num_hidden_layers"] + 1})),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "run"
    from test_train import Killed
    real = train.checkpoint.save

    def die_at_4(out_dir, model, tok, state, *a, **kw):
        path = real(out_dir, model, tok, state, *a, **kw)
        if state["gstep"] == 4:
            raise Killed(path)
        return path
    train.checkpoint.save = die_at_4
    try:
        with pytest.raises(Killed):
            run(out, "--checkpoint-every", "1", "--stages", "mef")
    finally:
        train.checkpoint.save = real
    return out


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_with_the_one_to_fall_back_to(
        two_checkpoints, tmp_path, what):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    DAMAGE[what](out / "ckpt-000004")
    with pytest.raises(UserError, match=r"ckpt-000004 is damaged.*"
                                        r"previous complete checkpoint is .*ckpt-000003"):
        run(out, "--resume", "--checkpoint-every", "1", "--stages", "mef")
    (out / "latest").write_text("ckpt-000003")  # what the message says to do
    run(out, "--resume", "--checkpoint-every", "1", "--stages", "mef")
    assert last(out).endswith("ckpt-000008")


@pytest.mark.parametrize("pointer", [b"", b"\xff\xfegarbage", b"ckpt-999999"])
def test_a_garbage_latest_pointer_names_the_fallback(two_checkpoints, tmp_path, pointer):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "latest").write_bytes(pointer)
    with pytest.raises(UserError, match="not a complete checkpoint.*ckpt-000004"):
        run(out, "--resume", "--stages", "mef")


@pytest.mark.parametrize("what", ["garbage config", "config with an extra layer"])
def test_a_damaged_config_json_is_named_for_init_and_eval_py(two_checkpoints, tmp_path, what):
    import eval as eval_cli
    bad = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints / "ckpt-000004", bad)
    DAMAGE[what](bad)
    with pytest.raises(UserError, match=r"--init .*ckpt is damaged: config.json"):
        run(tmp_path / "new", "--init", str(bad), "--stages", "mef")
    with pytest.raises(UserError, match=r"ckpt is damaged: config.json"):
        eval_cli.cli(["--model", str(bad)])


def test_a_binary_latest_pointer_is_shown_short(tmp_path):
    (tmp_path / "latest").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(UserError, match="not a complete checkpoint") as err:
        checkpoint.latest(str(tmp_path))
    assert len(str(err.value)) < len(str(tmp_path)) + 250 and "\n" not in str(err.value)


def test_a_finished_run_keeps_only_its_final_checkpoint(two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    assert len(list(out.glob("ckpt-*"))) == 2  # during the run: the latest and its fallback
    run(out, "--resume", "--checkpoint-every", "1", "--stages", "mef")
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-000008"]


# ---- faults injected at every file-system boundary of a save -------------------------------------

class Crash(BaseException):
    """A kill at this exact point (BaseException: no handler in the code under test may
    swallow it)."""


BOUNDARIES = [  # (what is patched, its nth call inside the save of step 6, the fault)
    ("shutil.rmtree", 1, "kill"),  # sweeping an old .tmp, before anything is written
    ("torch.save", 1, "kill"), ("torch.save", 1, "enospc"),  # the trainer state, after the weights
    ("safetensors.torch.save_file", 1, "enospc"),  # the weights
    ("os.rename", 1, "kill"),  # .tmp -> ckpt-000006
    ("os.replace", 1, "kill"),  # latest.tmp -> latest
    ("shutil.rmtree", 2, "kill"),  # a .prev (none here: a no-op)
    ("shutil.rmtree", 3, "kill"),  # pruning ckpt-000002, after the new one is the latest
]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out, "--checkpoint-every", "2", "--stages", "mef")
    return weights(last(out))


@pytest.mark.parametrize("target,nth,fault", BOUNDARIES,
                         ids=[f"{t}#{n}-{f}" for t, n, f in BOUNDARIES])
def test_a_fault_inside_a_save_loses_nothing_complete_and_resumes_to_the_same_weights(
        tmp_path, monkeypatch, reference_run, target, nth, fault):
    """The run saves at steps 2, 4, 6, 8; its save at step 6 is hit at the nth call of `target` (a
    kill, or a full disk). The resume must find a complete checkpoint (4 or 6) and end with the
    uninterrupted run's weights."""
    import importlib
    out = tmp_path / "run"
    module, fn = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    real, real_save = getattr(mod, fn), checkpoint.save
    calls = {"n": 0, "armed": False}

    def armed_save(out_dir, model, tok, state, *a, **kw):
        calls["armed"] = state["gstep"] == 6
        try:
            return real_save(out_dir, model, tok, state, *a, **kw)
        finally:
            calls["armed"] = False

    def faulty(*a, **kw):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == nth:
                if fault == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                raise Crash(f"{target} #{nth}")
        return real(*a, **kw)
    monkeypatch.setattr(train.checkpoint, "save", armed_save)
    monkeypatch.setattr(mod, fn, faulty)
    with pytest.raises((Crash, OSError)):
        run(out, "--checkpoint-every", "2", "--stages", "mef")
    monkeypatch.setattr(mod, fn, real)
    monkeypatch.setattr(train.checkpoint, "save", real_save)
    assert last(out).endswith(("ckpt-000004", "ckpt-000006"))  # something complete survived
    run(out, "--resume", "--checkpoint-every", "2", "--stages", "mef")
    final = weights(last(out))
    assert all(torch.equal(final[k], reference_run[k]) for k in reference_run)


def test_saving_the_same_step_twice_killed_between_its_renames_keeps_the_checkpoint(
        tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, "--checkpoint-every", "2", "--stages", "mef")
    before = weights(last(out))
    state = checkpoint.load_state(last(out))
    real = os.rename
    seen = []

    def rename(src, dst):
        seen.append((src, dst))
        if len(seen) == 2:  # after setting the old one aside, before the new one is in place
            raise Crash("killed")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    model = train.Transformer.from_pretrained(last(out))
    tok = train.load_tokenizer(last(out))
    with pytest.raises(Crash):
        checkpoint.save(str(out), model, tok, state)
    monkeypatch.setattr(os, "rename", real)
    assert seen[0][1].endswith(".prev")
    assert (last(out).endswith("ckpt-000008")
            and all(torch.equal(weights(last(out))[k], before[k]) for k in before))


# ---- Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    # 300 RIEL steps: the run is still going when the signal lands, however fast the machine
    cmd = [sys.executable, "train.py", "--out-dir", str(out), *SMALL,
           "--checkpoint-every", "1", "--riel.steps", "300"]
    # a pytest-xdist worker ignores SIGINT, and an ignored signal stays ignored across exec (Python
    # then installs no KeyboardInterrupt handler): the child gets back the default, as in a shell
    proc = subprocess.Popen(cmd, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_checkpoint(proc, out, "ckpt-000002", timeout=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("interrupted:")][0]
    assert "ckpt-0000" in line and "--resume" in line and f"--out-dir {out}" in line
    assert not (out / "run.lock").exists()


# ---- data files: errors name the file, the line and the field, before any training ---------------

GOOD = ('{"question": "Tom has 3 apples and buys 2. How many?", '
        '"answer": "3+2=<<3+2=5>>5\\n#### 5"}\n')
DATA_FAULTS = {
    "empty file": (b"", r"test.jsonl: holds no records"),
    "a number for the question": (b'{"question": 5, "answer": null}\n',
                                  r"test.jsonl:1: field 'question' should be str"),
    "a byte that is not UTF-8": (GOOD.encode() + b'{"question": "caf\xe9", "answer": "#### 1"}\n',
                                 r"test.jsonl:2: not UTF-8"),
}


@pytest.mark.parametrize("what", list(DATA_FAULTS))
def test_a_bad_data_file_is_named_with_its_line_before_training(tmp_path, what):
    content, message = DATA_FAULTS[what]
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(GOOD * 4)
    (tmp_path / "gsm8k" / "test.jsonl").write_bytes(content)
    import data
    with pytest.raises(UserError, match=message):
        data.load("gsm8k", "test", str(tmp_path))


def test_a_missing_split_file_is_named_before_training(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(GOOD * 4)  # no test.jsonl: the eval's
    monkeypatch.setattr(train.Transformer, "from_config",
                        lambda *a, **k: pytest.fail("model built first"))
    with pytest.raises(UserError, match=r"missing data file .*test.jsonl"):
        run(tmp_path / "run", "--data", "gsm8k", "--data-dir", str(tmp_path), "--stages", "mef",
            "eval")
    (tmp_path / "gsm8k" / "test.jsonl").write_text(GOOD * 4)
    with pytest.raises(UserError, match=r"gsm8k has splits \['train', 'test'\], not 'val'"):
        run(tmp_path / "run", "--data", "gsm8k", "--data-dir", str(tmp_path), "--eval-splits",
            "val")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---- eval.py says what it was given --------------------------------------------------------------

def test_eval_on_a_run_directory_points_to_its_checkpoint_and_names_a_damaged_one(
        two_checkpoints, tmp_path):
    import eval as eval_cli
    with pytest.raises(UserError, match=r"run directory, not a checkpoint.*ckpt-000004"):
        eval_cli.cli(["--model", str(two_checkpoints)])
    bad = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints / "ckpt-000004", bad)
    (bad / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="is damaged: model.safetensors"):
        eval_cli.cli(["--model", str(bad)])


def test_a_tracker_that_cannot_start_is_one_clear_error(tmp_path, monkeypatch):
    import types
    fake = types.ModuleType("wandb")

    def init(**kw):
        # what an installed, logged-out wandb raises
        raise RuntimeError("api_key not configured (no-tty)")
    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(UserError, match="wandb login"):
        run(tmp_path / "run", "--report-to", "wandb", "--stages", "mef")


def test_a_full_disk_mid_run_ends_with_one_line_naming_what_is_safe(tmp_path):
    """The command line, with torch.save failing as on a full disk at the third checkpoint: exit 2,
    one error line naming the last complete checkpoint and the command that resumes, no
    traceback."""
    out = tmp_path / "run"
    code = ("import errno, runpy, sys, torch\n"
            "real, n = torch.save, [0]\n"
            "def full(*a, **k):\n"
            "    n[0] += 1\n"
            "    if n[0] == 3: raise OSError(errno.ENOSPC, 'No space left on device', str(a[1]))\n"
            "    return real(*a, **k)\n"
            "torch.save = full\n"
            f"sys.argv = ['train.py', '--out-dir', {str(out)!r}, *{SMALL!r},"
            " '--checkpoint-every', '1', '--stages', 'mef']\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    line = [x[x.index("error:"):] for x in p.stderr.replace("\r", "\n").splitlines()
            if "error:" in x][0]
    assert "No space left on device" in line and "ckpt-000002" in line and "--resume" in line
