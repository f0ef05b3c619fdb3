"""
process.py: what a run owns while it trains, and how `python train.py` ends. train.py calls
these; they decide nothing about training itself.

- start_or_resume: a new run, or the run in --out-dir continued from its last complete
  checkpoint. `--resume` continues one and refuses a directory without one (a typo must not
  start over); `--resume-or-start` continues one where there is one, else starts; a run is
  never overwritten. What a run keeps beside its checkpoints is made the checkpoint's (tidy).
- RunLock: a run owns its directory. OUT/run.lock holds the owner's pid, host and start time,
  created exclusively before anything is written and removed at exit; a second run on the
  directory stops with a clear error; a lock whose process is gone from this host (dead, a zombie
  its parent never reaped, its pid now another process's or ours) is taken over with a warning,
  as is an empty one (its process died as it took it); one that names no owner is an error.
- SIGTERM (what a cluster scheduler sends before it kills), and SIGHUP (a closed terminal or ssh
  session; unless nohup ignores it): the handler only sets a flag. At the next step boundary every
  rank writes a checkpoint and stops (Stopped: exit 128 + the signal, 143 for SIGTERM, one line
  with the command that resumes); in a stage's evaluation it stops at the next eval batch (the
  stage's checkpoint stands; a resume runs the evaluation again). Under torchrun the ranks agree
  first (the MAX of their flags, one all-reduce a step or eval batch, as NeMo Automodel and
  Lightning do): a rank that stopped alone would hang the others in their next collective. A
  second signal stops at once, abandoning the step; the last complete checkpoint stays the latest.
- command_line: how the command ends: 0; `error: <message>` and 2 for a user's mistake, a full
  disk or a read-only directory; one line and 130 for Ctrl-C (at once, no checkpoint), 143 for
  SIGTERM, 129 for SIGHUP (the resume command it prints names the script as it was started); a
  traceback only for a bug.
"""
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager, suppress

from plumbing import checkpoint, dist, runlog
from plumbing.errors import UserError

# ---- start or resume ------------------------------------------------------------------------


def start_or_resume(cfg) -> tuple:
    """(the checkpoint this run continues, or None: a new run; the state: stage, step, ...)."""
    ckpt = dist.from_main(lambda: checkpoint.latest(cfg.out_dir))  # rank 0 sweeps half-written ones
    if ckpt and not (cfg.resume or cfg.resume_or_start):
        raise SystemExit(f"{cfg.out_dir} already holds a run (last checkpoint {ckpt}): pass "
                         "--resume to continue it, or choose another --out-dir")
    if cfg.resume and not ckpt and not cfg.resume_or_start:
        raise UserError(f"--resume: {cfg.out_dir} holds no complete checkpoint (no `latest` file): "
                        "nothing to resume. Check --out-dir, or pass --resume-or-start to start "
                        "a new run there")
    if not ckpt:
        if dist.is_main():
            tidy(cfg.out_dir, None)
        return None, {"gstep": 0, "done": [], "stage": None, "step": 0, "evals": {}, "wall_s": 0.0}
    if dist.is_main():
        checkpoint.check(ckpt, cfg.out_dir)  # a damaged one is named, with the one to fall back to
    state = checkpoint.load_state(ckpt)
    if dist.is_main():
        tidy(cfg.out_dir, state)
    return ckpt, state


STALE = ("reference", "reference.tmp", "lora_base", "lora_base.tmp")  # checkpoint.py, lora.py


def tidy(out_dir: str, state: dict | None):
    """What a run keeps beside its checkpoints, made the checkpoint's (state; None: a new run).
    flushed.jsonl is cut back to its RIEL step: a step redone after a kill would list its entries
    twice (--sft-replay replays that file). A new run removes OUT/reference and OUT/lora_base, which
    a run writes once and reuses on resume: one left by an earlier attempt that never checkpointed
    holds that attempt's weights (another --init, --seed, ...), which the new run would take for
    its own."""
    flushed = os.path.join(out_dir, "flushed.jsonl")
    riel = state["step"] if state and state["stage"] == "riel" else 0
    if os.path.exists(flushed):
        kept = [x for x in runlog.read_lines(flushed) if json.loads(x)["step"] <= riel]
        with open(flushed + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(flushed + ".tmp", flushed)
    for name in STALE if state is None else ():
        if os.path.exists(os.path.join(out_dir, name)):
            print(f"warning: {os.path.join(out_dir, name)}: removed, left by an earlier run in "
                  f"{out_dir} that wrote no checkpoint", file=sys.stderr)
            shutil.rmtree(os.path.join(out_dir, name))


# ---- the lock -------------------------------------------------------------------------------

def _started(pid: int) -> str | None:
    """When process pid started (clock ticks since boot, /proc/PID/stat field 22), or None (no
    /proc: macOS). With the pid it names one process: a pid reused by another has another start."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    try:  # Linux: a zombie (it exited, its parent has not reaped it) still answers kill(pid, 0)
        with open(f"/proc/{pid}/status") as f:
            return not any(line.split()[:2] in (["State:", "Z"], ["State:", "X"]) for line in f)
    except OSError:  # no /proc (macOS), or hidden from us: trust kill
        return True


class RunLock:
    """OUT/run.lock, held from before the first write until exit. A second run on the directory is
    refused; a lock left by a process of this host that is gone (dead, a zombie, its pid reused: by
    another process, or by ours in a restarted container) is taken over. It holds "pid host start"
    (start: _started, which tells a reused pid from its owner)."""

    EMPTY_AFTER_S = 60  # an empty lock this old: its writer died between creating and writing it
    mine = set()  # the locks this process holds (absolute paths)

    def __init__(self, out_dir: str):
        self.path, self.held = os.path.join(out_dir, "run.lock"), False

    def acquire(self):
        me = f"{os.getpid()} {socket.gethostname()} {_started(os.getpid()) or ''}".strip()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pid, host, started = self.owner()
                here = host == socket.gethostname()
                if host == socket.gethostname() and pid is not None and not _alive(pid):
                    why = f"the lock of process {pid}, which is no longer running"
                elif here and pid is not None and self._reused(pid, started):
                    whose = "this process's" if pid == os.getpid() else "another process's"
                    why = (f"the lock of process {pid}, which is no longer running (its pid is "
                           f"now {whose})")
                elif pid is None:
                    why = self._unowned()  # an empty lock of a process that died, or an error
                else:
                    raise UserError(f"{os.path.dirname(self.path)} is in use by process {pid} "
                                    f"on {host} ({self.path}): wait for it, or choose another "
                                    "--out-dir. If that process is gone (another machine), delete "
                                    "the lock file by hand.")
                warnings.warn(f"{self.path}: taking over {why}")
                with suppress(FileNotFoundError):  # released meanwhile
                    os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me)
                f.flush()
                os.fsync(f.fileno())  # a power cut must not leave an empty lock
            self.held = True
            RunLock.mine.add(os.path.abspath(self.path))
            return self
        raise UserError(f"{self.path}: could not take the lock")

    def _reused(self, pid: int, started: str | None) -> bool:
        """Whether the live process pid is not the one that wrote the lock."""
        if pid == os.getpid():  # ours: a lock this process holds, or an earlier process's
            return os.path.abspath(self.path) not in RunLock.mine
        return started is not None and _started(pid) not in (None, started)

    def _unowned(self) -> str:
        """A lock that names no process: an empty one of a process that died as it took the lock
        (what is taken over), else a UserError that says what the file holds."""
        try:
            with open(self.path) as f:
                text, age = f.read(), time.time() - os.path.getmtime(self.path)
        except IsADirectoryError:
            text, age = None, 0
        except FileNotFoundError:  # its owner just released it
            return "a lock released meanwhile"
        if text == "" and age > self.EMPTY_AFTER_S:
            return f"an empty lock written {age:.0f} s ago (its process died as it took the lock)"
        what = ("is a directory" if text is None else "is empty" if text == "" else
                f"holds {text[:80]!r}, not 'pid host'")
        raise UserError(f"{self.path} {what}: it names no run that holds "
                        f"{os.path.dirname(self.path)}"
                        + (" (a run may be taking it right now)" if text == "" else "")
                        + ". If no run uses that directory, delete it by hand: rm -r "
                        + shlex.quote(self.path))

    def owner(self):
        """(pid, host, start or None) of the lock's process, or (None, None, None): no such lock,
        or not one we wrote."""
        try:
            with open(self.path) as f:
                pid, host, *started = f.read().split()
            return int(pid), host, (started[0] if len(started) == 1 else None)
        except (OSError, ValueError):
            return None, None, None

    def release(self):
        try:
            if self.held and self.owner()[0] == os.getpid():
                os.remove(self.path)
        except OSError:  # a file system turned read-only: the error that ends the run is named
            pass  # instead; the next run takes the lock over (this process is gone by then)
        RunLock.mine.discard(os.path.abspath(self.path))
        self.held = False


# ---- signals --------------------------------------------------------------------------------

_flag = {"signum": None}  # set by the handler, read at step boundaries


class Stopped(BaseException):
    """The run stopped on a signal. A BaseException, as KeyboardInterrupt: no `except Exception`
    on the way up may swallow it."""

    def __init__(self, signum=None):
        self.signum = signum or _flag["signum"] or signal.SIGTERM  # another rank's: SIGTERM
        super().__init__(signal.Signals(self.signum).name)


STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


def _on_signal(signum, frame):
    if _flag["signum"] is not None:  # the second one: stop now, abandoning the step
        raise Stopped(signum)
    _flag["signum"] = signum
    if dist.is_main():  # os.write: a print here could land inside tqdm's own write to stderr
        with suppress(OSError):  # SIGHUP: the terminal may be gone
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step (or eval "
                        "batch), with a checkpoint (send it again to stop at once)\n".encode())


def stop_requested() -> bool:
    """At a step boundary: whether any rank got SIGTERM. Every rank asks at the same boundaries,
    so all get one answer (the MAX of the 0/1 flags, as a sum; one process: no collective)."""
    return dist.sum_floats([float(_flag["signum"] is not None)])[0] > 0


def stop_point():
    """A boundary where a stop may end the run (an eval batch): Stopped if any rank got a signal."""
    if stop_requested():
        raise Stopped()


@contextmanager
def owned(out_dir: str):
    """The run's hold on the process until it ends, however it ends: the lock on out_dir (rank 0)
    and the SIGTERM / SIGHUP handler (the one before it comes back, e.g. under pytest; an ignored
    SIGHUP, nohup's, stays ignored)."""
    _flag["signum"] = None
    main = threading.current_thread() is threading.main_thread()  # only it may set a handler
    mine = [s for s in STOP_SIGNALS if main and (s == signal.SIGTERM
                                                 or signal.getsignal(s) is not signal.SIG_IGN)]
    previous = {s: signal.signal(s, _on_signal) for s in mine}
    lock = None
    try:
        lock = RunLock(out_dir).acquire() if dist.is_main() else None
        yield
    finally:
        if lock is not None:
            lock.release()
        for s, before in previous.items():
            signal.signal(s, signal.SIG_DFL if before is None else before)


# ---- how the command ends -------------------------------------------------------------------

def resume_command(argv) -> str:
    """The command that continues this run: its arguments and --resume (under torchrun, its
    launcher: one node's is its process count; several nodes need their own options)."""
    args = [a for a in argv if a not in ("--resume", "--resume-or-start")] + ["--resume"]
    launcher = "python"
    if dist.launched():
        local = os.environ.get("LOCAL_WORLD_SIZE")
        launcher = (f"torchrun --standalone --nproc_per_node {local}"
                    if local == os.environ["WORLD_SIZE"] else "torchrun <its launcher options>")
    script = sys.argv[0] if sys.argv[0].endswith(".py") else "train.py"  # as it was started
    return f"{launcher} {shlex.quote(script)} {shlex.join(args)}"


def stopped_message(cfg, argv) -> str:
    """Where a stopped run stands: its last complete checkpoint, the command that continues it."""
    if cfg is None:
        return ""
    try:
        last = checkpoint.latest(cfg.out_dir)
    except (UserError, OSError):
        last = None
    if last is None:
        return (f"no checkpoint was written yet in {cfg.out_dir}: run the same command again "
                "to start over")
    return f"the last complete checkpoint is {last}; continue with: {resume_command(argv)}"


def command_line(cli, main):
    """`python train.py`: main(cli()), ended as the module docstring says."""
    config, argv = None, sys.argv[1:]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # train.py's, while it imported
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt
    try:
        config = cli()
        main(config)
    except UserError as e:  # bad input, not a bug: the message is the whole report (errors.py)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130: the shell's for SIGINT
        print(f"\ninterrupted: {stopped_message(config, argv)}", file=sys.stderr)
        sys.exit(130)
    except Stopped as e:  # SIGTERM, SIGHUP: checkpointed at a step boundary; 128 + 15, as a shell
        if dist.is_main():
            print(f"\nstopped by {e}: {stopped_message(config, argv)}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except OSError as e:  # a full disk, a read-only or vanished directory: what is safe, and how on
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        print(f"error: {e.strerror} writing {e.filename or config.out_dir}; "
              f"{stopped_message(config, argv)}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if not isinstance(e.code, str):  # tyro's --help (0) and usage errors (2)
            raise
        print(f"error: {e.code}", file=sys.stderr)  # ours, e.g. an existing run without --resume
        sys.exit(2)
    finally:
        dist.teardown()
