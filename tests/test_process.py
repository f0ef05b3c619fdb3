"""process.py and the resume rules around it, run for real: SIGTERM checkpoints at a step boundary
and exits 143 with the command that resumes (and ranks agree on the step); --resume-or-start alone
starts or resumes; an unset --riel.buffer-k derives K from G, also for a checkpoint that saved the
old default; a larger --riel.steps / --mef.epochs extends a finished stage; a lock left by a dead
or zombie process is taken over."""
import dataclasses
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train
from conftest import free_port
from plumbing import checkpoint, dist, guard, process
from plumbing.errors import UserError
from test_train import SMALL, killed_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small(options: dict) -> list:
    """SMALL with single-valued options replaced ({"riel.steps": "8"}), or dropped (None)."""
    args = list(SMALL)
    for name, value in options.items():
        i = args.index("--" + name)
        args[i:i + 2] = [] if value is None else [args[i], value]
    return args


def go(out, *args):
    train.main(train.cli(["--out-dir", str(out), *args]))


def lines(out) -> list:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---- SIGTERM ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_mid_riel_checkpoints_exits_143_with_the_command_that_resumes(tmp_path, sig):
    """No other checkpoint is due (--checkpoint-every 100): the one after the stop is the stop's.
    SIGHUP (a closed terminal) takes the same path, exit 129."""
    out = tmp_path / "run"
    args = ["--out-dir", str(out), *small({"riel.steps": "6", "riel.max-new-tokens": "8"}),
            "--stages", "riel", "--checkpoint-every", "100"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # RIEL's first step is logged
        if (out / "metrics.jsonl").exists() and '"riel"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    assert f"{sig.name}: stopping after this step" in err
    said = [x for x in err.splitlines() if x.startswith(f"stopped by {sig.name}: ")]
    assert len(said) == 1, err[-3000:]
    state = checkpoint.load_state(checkpoint.latest(str(out)))
    assert state["stage"] == "riel" and 1 <= state["step"] < 6
    assert state["optimizer"] is not None and state["generator"] is not None  # mid-stage: all of it
    assert f"ckpt-{state['gstep']:06d}; continue with: python train.py " in said[0]
    assert not (out / "run.lock").exists()
    command = shlex.split(said[0].split("continue with: ")[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    train.main(train.cli(command[2:]))  # the printed command finishes the run
    assert [m["step"] for m in lines(out) if m["stage"] == "riel"] == list(range(1, 7))


@pytest.mark.parametrize("stages, stage", [(["riel", "eval"], "riel"),
                                           (["mef", "riel", "eval"], "mef")],
                         ids=["last eval", "after-MEF eval"])
def test_sigterm_during_an_eval_stops_at_a_batch_and_the_resume_evaluates(tmp_path, stages, stage):
    """300 eval batches: the stop comes at the next one, not after the eval (nor a stage more);
    the stage's checkpoint stands without the eval, which the printed command runs again."""
    import threading
    out, key = tmp_path / "run", f"after_{stage}"
    args = [*small({"eval.size": "200", "eval.max-new-tokens": "64"}), "--eval.batch-size", "2",
            "--stages", *stages]
    proc = subprocess.Popen([sys.executable, "train.py", "--out-dir", str(out), *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(
        lambda: os.read(proc.stderr.fileno(), 4096), b"")))
    reader.start()
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and b"eval:" not in b"".join(chunks):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)  # one batch of 2 questions, not the 299 left
    finally:
        proc.kill()  # a no-op once it has ended
        reader.join()
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    said = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM: ")]
    assert len(said) == 1, err[-3000:]
    state = checkpoint.load_state(checkpoint.latest(str(out)))
    assert state["done"] == [stage] and key not in state["evals"]
    assert not [m for m in lines(out) if m["stage"] == "eval" or m["stage"] == "riel" != stage]
    assert not (out / "run.lock").exists()
    command = shlex.split(said[0].split("continue with: ")[1])
    assert command[2:] == ["--out-dir", str(out), *args, "--resume"]
    go(out, *small({}), "--eval.batch-size", "2", "--stages", *stages, "--resume",
       "--resume-allow-change", "eval.size", "eval.max-new-tokens")  # the same run, 8 questions
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evals"][key]["questions"] == 8


def _stop_rank(rank, port, out):
    """One of two gloo ranks stepping 1..5; rank 1 alone gets SIGTERM during step 3."""
    from datetime import timedelta
    import torch.distributed as td
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    td.init_process_group("gloo", timeout=timedelta(seconds=30))  # a rank left alone fails
    try:
        stopped_at = None
        with process.owned(out):
            for step in range(1, 6):
                if rank == 1 and step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if process.stop_requested():
                    stopped_at = step
                    break
        at = dist.all_gather_object(stopped_at)
        if rank == 0:
            torch.save(at, os.path.join(out, "stopped_at.pt"))
    finally:
        dist.teardown()


def test_two_ranks_stop_at_the_same_step_when_one_gets_sigterm(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_stop_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "stopped_at.pt") == [3, 3]


def test_a_second_sigterm_stops_at_once_and_the_handler_is_given_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(process.Stopped, match="SIGTERM"):
        with process.owned(str(tmp_path)):
            os.kill(os.getpid(), signal.SIGTERM)
            assert process.stop_requested()  # the first: a flag, read at the next step boundary
            os.kill(os.getpid(), signal.SIGTERM)  # the second: raised here
            time.sleep(5)
            pytest.fail("the second SIGTERM did not stop the run")
    assert signal.getsignal(signal.SIGTERM) == before and not (tmp_path / "run.lock").exists()


def test_sighup_is_caught_unless_ignored_as_under_nohup(tmp_path):
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with process.owned(str(tmp_path)):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is process._on_signal
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with process.owned(str(tmp_path)):
            assert signal.getsignal(signal.SIGHUP) is process._on_signal
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


# ---- start or resume --------------------------------------------------------------------------

def test_resume_or_start_alone_starts_an_empty_directory_and_resumes_a_run(tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "run"
    args = (*small({"train-size": "12"}), "--resume-or-start", "--stages", "mef",
            "--checkpoint-every", "1")
    killed_after_checkpoint(monkeypatch, lambda: go(out, *args), gstep=1)  # started: 1 of 2 steps
    assert "resuming" not in capsys.readouterr().out
    go(out, *args)
    assert f"resuming from {out / 'ckpt-000001'}" in capsys.readouterr().out
    assert [m["gstep"] for m in lines(out) if m["stage"] == "mef"] == [1, 2]


# ---- K from G -----------------------------------------------------------------------------------

def test_group_size_without_buffer_k_derives_k_and_resumes_a_checkpoint_that_saved_it(tmp_path):
    out = tmp_path / "run"
    # python train.py --riel.group-size 4 ... without --riel.buffer-k
    args = [*small({"riel.group-size": "4", "riel.buffer-k": None, "riel.steps": "2"}),
            "--stages", "riel"]
    p = subprocess.run([sys.executable, "train.py", "--out-dir", str(out), *args], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    riel = json.loads((out / "summary.json").read_text())["config"]["riel"]
    assert riel["buffer_k"] is None and riel["group_size"] == 4
    # the previous version saved K itself: 3 at G = 4 is what an unset K derives, 2 is not
    ckpt = Path(checkpoint.latest(str(out)))
    for saved_k in (3, 2):
        state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=False)
        state["config"]["riel"]["buffer_k"] = saved_k
        torch.save(state, ckpt / checkpoint.STATE_FILE)
        resume = lambda: train.main(train.cli(["--out-dir", str(out), *args, "--resume"]))
        if saved_k == 3:
            resume()
        else:
            with pytest.raises(UserError, match="--riel.buffer-k 2 -> 3"):
                resume()


def test_the_former_default_k_6_resumes_under_the_unset_default_at_g_8():
    cfg = train.cli([])  # tiny: G = 8, K unset
    assert cfg.riel.buffer_k is None and cfg.riel.hard_k() == 6
    saved = dataclasses.asdict(cfg)
    saved["riel"]["buffer_k"] = 6
    state = {"config": saved, "done": [], "stage": "riel", "step": 3, "gstep": 3}
    guard.resume_checks(cfg, state)
    assert "changes" not in state


# ---- a longer stage ---------------------------------------------------------------------------

def test_a_larger_riel_steps_extends_the_finished_stage_and_evaluates_at_its_new_end(tmp_path):
    out = tmp_path / "run"
    args = (*small({"riel.max-new-tokens": "8", "eval.size": "4"}), "--stages", "riel", "eval")
    go(out, *args, "--riel.steps", "2")
    for refused in (["--riel.steps", "1"], ["--riel.steps", "3", "--seed", "3"]):
        with pytest.raises(UserError, match="would change what this run computes"):
            go(out, *args, "--resume", *refused)
    go(out, *args, "--resume", "--riel.steps", "3")
    logged = lines(out)
    assert [m["step"] for m in logged if m["stage"] == "riel"] == [1, 2, 3]
    assert [m["gstep"] for m in logged if m["stage"] == "eval"] == [2, 3]  # run again at the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resume_changes"] == [{"gstep": 2, "changes": [["riel.steps", 2, 3]]}]
    assert summary["checkpoint"].endswith("ckpt-000003")


def test_a_larger_mef_epochs_extends_mef_but_not_once_riel_has_trained_on_it(tmp_path):
    out = tmp_path / "run"
    args = (*small({"train-size": "12"}), "--stages", "mef")  # 1 epoch of 2 steps
    go(out, *args)
    go(out, *args, "--resume", "--mef.epochs", "2")
    assert [m["step"] for m in lines(out) if m["stage"] == "mef"] == [1, 2, 3, 4]
    cfg = train.cli(["--mef.epochs", "3"])
    saved = dataclasses.asdict(train.cli([]))
    state = {"config": saved, "done": ["mef"], "stage": "riel", "step": 2, "gstep": 20}
    with pytest.raises(UserError, match="riel has trained on its result"):
        guard.resume_checks(cfg, state)


# ---- the lock -----------------------------------------------------------------------------------

def _state(pid) -> str:
    """A Linux process's state letter (R running, S sleeping, Z zombie, ...)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(line.split()[1] for line in status if line.startswith("State:"))


def test_a_lock_of_a_dead_or_zombie_process_is_taken_over_and_a_live_ones_is_not(tmp_path):
    lock, host = tmp_path / "run.lock", socket.gethostname()
    zombie = subprocess.Popen(["true"])  # it exits; nobody reaps it until wait() below
    try:
        deadline = time.time() + 30
        while _state(zombie.pid) != "Z":
            assert time.time() < deadline, "the child never became a zombie"
            time.sleep(0.01)
        os.kill(zombie.pid, 0)  # a zombie still answers kill(pid, 0): why /proc is read
        lock.write_text(f"{zombie.pid} {host}")
        with pytest.warns(UserWarning, match=f"process {zombie.pid}, which is no longer running"):
            process.RunLock(str(tmp_path)).acquire().release()
    finally:
        zombie.wait()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(f"{dead.pid} {host}")
    with pytest.warns(UserWarning, match="no longer running"):
        process.RunLock(str(tmp_path)).acquire().release()
    assert not lock.exists()
    lock.write_text(f"{os.getppid()} {host}")  # alive: pytest's parent
    with pytest.raises(UserError, match=f"in use by process {os.getppid()}"):
        process.RunLock(str(tmp_path)).acquire()


# ---- found by breaking it as a user would (each test: a bug that was there) ---------------------

class Died(Exception):
    """The run killed at a chosen point (SIGKILL, Ctrl-C): no checkpoint of its own."""


def _die_at_riel_step(monkeypatch, step):
    """The run dies as it logs RIEL step `step`: after that step's flushed.jsonl entries."""
    real = train.runlog.MetricsLog.write

    def write(self, record):
        if record.get("stage") == "riel" and record.get("step") == step:
            raise Died(step)
        real(self, record)
    monkeypatch.setattr(train.runlog.MetricsLog, "write", write)


def test_a_run_killed_mid_riel_resumes_without_listing_entries_or_evals_twice(tmp_path,
                                                                              monkeypatch):
    """Killed at RIEL step 2 (the checkpoint is MEF's last): steps 1-2 are redone, and their
    flushed.jsonl entries were listed twice (--sft-replay replays them); the after_mef evaluation,
    run after that checkpoint, was run and logged again, and so was after_riel on a resume of the
    finished run (a scheduler's --resume-or-start)."""
    args = small({"train-size": "12", "riel.max-new-tokens": "8", "eval.size": "4"})
    go(tmp_path / "whole", *args)
    out = tmp_path / "run"
    _die_at_riel_step(monkeypatch, 2)
    with pytest.raises(Died):
        go(out, *args)
    monkeypatch.undo()
    assert checkpoint.latest(str(out)).endswith("ckpt-000002")
    assert '"step": 2' in (out / "flushed.jsonl").read_text()  # step 2 flushed before it died
    evaluated = []
    real = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: evaluated.append(1) or real(*a, **k))
    go(out, *args, "--resume")
    go(out, *args, "--resume-or-start")  # finished: nothing to do again
    assert len(evaluated) == 1  # after_riel, once
    assert (out / "flushed.jsonl").read_text() == (tmp_path / "whole" / "flushed.jsonl").read_text()
    names = [m["name"] for m in lines(out) if m["stage"] == "eval"]
    assert names == ["after_mef", "after_riel"]
    state = checkpoint.load_state(checkpoint.latest(str(out)))
    assert sorted(state["evals"]) == ["after_mef", "after_riel"]


def test_a_new_run_does_not_take_an_earlier_attempts_reference_base_or_flushed_entries(tmp_path):
    """A run killed before its first checkpoint leaves OUT/reference (--riel.kl-beta), OUT/lora_base
    (--lora-rank), flushed.jsonl; a new run there (another --seed, --init) took them for its own:
    a KL to other weights, a resume rebuilt from another base."""
    out = tmp_path / "run"
    stale = train.Transformer.from_config(train.tiny_config(), torch.device("cpu"), seed=7)
    for name in ("reference", "lora_base"):
        stale.save_pretrained(str(out / name))
    (out / "flushed.jsonl").write_text('{"step": 1, "question_id": "q", "expert": "chain"}\n')
    go(out, *small({"riel.steps": "1", "riel.max-new-tokens": "8"}), "--stages", "riel",
       "--riel.kl-beta", "0.1")
    start = train.Transformer.from_config(train.tiny_config(), torch.device("cpu"), seed=0)
    ref = train.Transformer.from_pretrained(str(out / "reference"))
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                  start.state_dict().values()))
    assert not (out / "lora_base").exists()
    assert '"question_id": "q"' not in (out / "flushed.jsonl").read_text()


def test_tidy_cuts_flushed_entries_back_to_the_checkpoint_and_keeps_a_resumed_runs_files(tmp_path):
    (tmp_path / "flushed.jsonl").write_text("".join(
        json.dumps({"step": s, "question_id": f"q{s}", "expert": "chain"}) + "\n"
        for s in (1, 2, 3, 3, 4)))
    (tmp_path / "reference").mkdir()
    process.tidy(str(tmp_path), {"stage": "riel", "step": 3})
    assert [json.loads(x)["step"] for x in open(tmp_path / "flushed.jsonl")] == [1, 2, 3, 3]
    assert (tmp_path / "reference").exists()  # a resumed run's own
    process.tidy(str(tmp_path), {"stage": "mef", "step": 5})  # RIEL not begun at the checkpoint
    assert (tmp_path / "flushed.jsonl").read_text() == ""


def test_a_lock_that_names_no_owner_is_named_and_an_old_empty_one_taken_over(tmp_path):
    """An empty lock (a process killed as it took it), garbage, a directory: each was 'in use by
    process None on ?', and an empty one blocked every restart."""
    lock = tmp_path / "run.lock"
    lock.write_text("")
    with pytest.raises(UserError, match=r"run.lock is empty: .* delete it by hand"):
        process.RunLock(str(tmp_path)).acquire()
    os.utime(lock, (time.time() - 120, time.time() - 120))
    with pytest.warns(UserWarning, match="taking over an empty lock"):
        process.RunLock(str(tmp_path)).acquire().release()
    lock.write_text("hello world how")
    with pytest.raises(UserError, match=r"holds 'hello world how', not 'pid host'"):
        process.RunLock(str(tmp_path)).acquire()
    lock.unlink()
    lock.mkdir()
    with pytest.raises(UserError, match="run.lock is a directory"):
        process.RunLock(str(tmp_path)).acquire()


def test_a_lock_whose_pid_is_now_another_process_or_ours_is_taken_over(tmp_path):
    """A pid is reused (a container restarted gives train.py the pid its last run had): the lock
    refused the new run as 'in use' by an unrelated process, or by itself."""
    lock, host = tmp_path / "run.lock", socket.gethostname()
    lock.write_text(f"{os.getpid()} {host}")  # an earlier process with our pid
    with pytest.warns(UserWarning, match="no longer running"):
        held = process.RunLock(str(tmp_path)).acquire()
    pid, _, started = held.owner()
    assert pid == os.getpid() and started == process._started(os.getpid())
    with pytest.raises(UserError, match="in use by process"):  # ours, held: in use
        process.RunLock(str(tmp_path)).acquire()
    held.release()
    other = subprocess.Popen(["sleep", "60"])
    try:
        lock.write_text(f"{other.pid} {host} 1")  # its owner started at tick 1, this one later
        with pytest.warns(UserWarning, match=f"process {other.pid}, which is no longer running"):
            process.RunLock(str(tmp_path)).acquire().release()
        lock.write_text(f"{other.pid} {host} {process._started(other.pid)}")  # the owner itself
        with pytest.raises(UserError, match=f"in use by process {other.pid}"):
            process.RunLock(str(tmp_path)).acquire()
    finally:
        other.kill()
        other.wait()


def test_a_lock_that_cannot_be_removed_does_not_hide_the_error_that_ended_the_run(tmp_path,
                                                                                 monkeypatch):
    """A file system turned read-only mid-run: the lock's removal failed too, and its error, naming
    run.lock, replaced the one that ended the run."""
    held = process.RunLock(str(tmp_path)).acquire()

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(os, "remove", read_only)
    held.release()
    assert not held.held


def test_the_resume_command_names_the_script_as_it_was_started(monkeypatch, tmp_path):
    """`python /abs/train.py` from another directory printed `python train.py`, which fails there;
    an odd --out-dir is quoted."""
    odd = str(tmp_path / "it's a \"run\" $HOME")
    monkeypatch.setattr(sys, "argv", ["/somewhere/else/train.py"])
    command = process.resume_command(["--out-dir", odd, "--resume-or-start"])
    assert shlex.split(command) == ["python", "/somewhere/else/train.py", "--out-dir", odd,
                                    "--resume"]


def test_a_checkpoint_not_yet_named_by_latest_is_the_latest(tmp_path):
    """Killed between the first checkpoint's rename and `latest`: --resume said 'no complete
    checkpoint', and a plain start (or --resume-or-start) wrote over it."""
    out = tmp_path / "run"
    args = (*small({"riel.steps": "1", "riel.max-new-tokens": "8"}), "--stages", "riel")
    go(out, *args)
    (out / "latest").unlink()
    assert checkpoint.latest(str(out)) == str(out / "ckpt-000001")
    with pytest.raises(SystemExit, match="already holds a run"):
        go(out, *args)
    go(out, *args, "--resume", "--riel.steps", "2")
    assert [m["step"] for m in lines(out) if m["stage"] == "riel"] == [1, 2]


def test_an_option_the_checkpoint_lacks_is_compared_with_its_default(tmp_path):
    """A checkpoint written before an option existed (or edited by hand): that option set on
    --resume changed the run silently; one with no config at all was not checked."""
    cfg = train.cli(["--riel.mask-truncated"])
    default = dataclasses.asdict(train.cli([]))
    saved = dataclasses.asdict(train.cli([]))
    del saved["riel"]["mask_truncated"]
    state = {"config": saved, "done": [], "stage": "riel", "step": 3, "gstep": 3}
    with pytest.raises(UserError, match="--riel.mask-truncated False -> True"):
        guard.resume_checks(cfg, state, default)
    guard.resume_checks(train.cli([]), state, default)  # left at its default: the same run
    with pytest.raises(UserError, match="records no options"):
        guard.resume_checks(cfg, {"done": [], "stage": "riel", "step": 3, "gstep": 3}, default)


def test_a_full_disk_in_safetensors_or_torch_save_is_an_oserror(tmp_path, monkeypatch):
    """Neither library raises an OSError for a full disk: safetensors says '(os error 28)',
    torch.save 'unexpected pos': the command line ended with a traceback, not `error:`."""
    from safetensors import SafetensorError

    class Model:
        def save_pretrained(self, path, state=None):
            os.makedirs(path)
            if full_in == "safetensors":
                raise SafetensorError("Error while serializing: I/O error: No space left on "
                                      "device (os error 28)")

    class Tokenizer:
        def save_pretrained(self, path):
            pass

    def torch_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5 vs 3")
    monkeypatch.setattr(torch, "save", torch_save)
    for full_in, free in (("safetensors", 10 << 20), ("torch.save", 0), ("neither", 10 << 20)):
        monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=free))
        with pytest.raises(RuntimeError if full_in == "neither" else OSError) as err:
            checkpoint.save(str(tmp_path), Model(), Tokenizer(), {"gstep": 1})
        if full_in != "neither":  # with room left a RuntimeError is a bug: raised as it is
            assert err.value.errno == errno.ENOSPC and err.value.filename == str(tmp_path)
    assert checkpoint.latest(str(tmp_path)) is None


def test_out_dir_a_file_and_a_mistyped_resume_are_named_and_make_nothing(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        guard.check_writable(str(tmp_path / "a_file"))
    with pytest.raises(UserError, match="does not exist: nothing to resume"):
        guard.check_writable(str(tmp_path / "typo"), resume=True)
    assert not (tmp_path / "typo").exists()  # was made, empty


def test_ctrl_c_while_train_py_imports_is_one_line_and_130(tmp_path):
    """Ctrl-C in the seconds `import torch` takes ended with a KeyboardInterrupt traceback."""
    code = ("import os, runpy, signal, sys\n"
            "class Finder:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, Finder())\n"
            f"sys.argv = ['train.py', '--out-dir', {str(tmp_path / 'run')!r}]\n"
            "runpy.run_path('train.py', run_name='__main__')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip() == "interrupted: nothing was written yet"
