"""
The mutation check: do the tests fail when the code is wrong?

    python -m tests.mutate               # every mutation, two at a time (~4 min on 2 cores);
                                         # exit 1 if any is missed
    python -m tests.mutate --only k3     # the mutations whose name contains "k3"
    python -m tests.mutate --list        # the list, with the tests meant to catch each

Each mutation is a one-line bug (a flipped sign, a swapped index, a dropped weight or mask, an
off-by-one, state forgotten on resume) put into a fresh copy of the project (the files git tracks or
would track, with ../shared beside it); the tests named with it then run on that copy. A mutation is
*caught* when they fail, *missed* when they pass. Before any mutation, the same tests run on an
unmutated copy and must pass, so a caught mutation means the bug was caught, not that the tests were
broken already. Every mutation's text must occur exactly once in its file (tests/test_mutate.py
checks this in the fast suite), so the list cannot silently go stale as the code moves.

Run it before calling a change to the core (riel, losses, buffer, mef, mel, eval, rollout, verify,
train, premise, the synthetic testbeds, the fair ablation's choices) done;
a new rule in the core wants a mutation in tests/mutations.py and a test that catches it.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # `python -m tests.mutate` runs from the root
from mutations import MUTATIONS, Mutation  # noqa: E402  (the list; this file runs it)


def source_files() -> list:
    """What a clean clone would hold, plus files not yet committed (git's view: tracked, or
    untracked and not ignored), so that the check runs on the work in progress."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def project_copy(workdir: Path, files: list) -> Path:
    """A copy of the project at workdir/repo, with ../shared beside it as a link (the tests look
    there)."""
    repo = workdir / "repo"
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    if (ROOT.parent / "shared").exists():
        (workdir / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def apply(repo: Path, m: Mutation):
    path = repo / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise ValueError(f"{m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.file}, "
                         "not once")
    path.write_text(text.replace(m.old, m.new))


def run_tests(repo: Path, tests, timeout) -> tuple:
    """pytest on the copy, one process of one thread, stopping at the first failure ->
    (status, seconds)."""
    env = {**os.environ, "TEST_THREADS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
           "-m", "", *tests]  # -m "": the named tests run, slow or not
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    return {0: "passed", 1: "failed"}.get(rc, f"error {rc}"), time.time() - t0


def check(m: Mutation | None, files, tests, timeout) -> tuple:
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        repo = project_copy(Path(tmp), files)
        if m is not None:
            apply(repo, m)
        return run_tests(repo, tests, timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default=None, help="run the mutations whose name contains this text")
    ap.add_argument("--jobs", type=int, default=2,
                    help="mutations checked at once (one thread each)")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds per mutation's tests (a timeout counts as caught)")
    ap.add_argument("--list", action="store_true",
                    help="print the mutations and their tests, run nothing")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.only is None or a.only.lower() in m.name.lower()]
    if a.list or not chosen:
        for i, m in enumerate(chosen, 1):
            print(f"{i:>2} {m.file:<10} {m.name}\n   {' '.join(m.tests)}")
        return 0 if chosen else 2
    files, t0 = source_files(), time.time()
    needed = sorted({t for m in chosen for t in m.tests})
    status, secs = check(None, files, needed, a.timeout * 2)
    print(f"unmutated copy: the {len(needed)} tests {status} ({secs:.0f} s)", flush=True)
    if status != "passed":
        print("the tests must pass on the unmutated code first: fix them, then run this again")
        return 2
    rows = [None] * len(chosen)

    def one(i):
        rows[i] = check(chosen[i], files, list(chosen[i].tests), a.timeout)
        print(f"  {i + 1:>2}/{len(chosen)} {rows[i][0]:<8} {chosen[i].name}", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(one, range(len(chosen))))
    print("\n| # | file | mutation | tests | result | s |\n|---|---|---|---|---|---|")
    missed = 0
    for i, (m, (status, secs)) in enumerate(zip(chosen, rows), 1):
        caught = status != "passed"
        missed += not caught
        tests = ", ".join(t.split("::")[-1] if "::" in t else t for t in m.tests)
        print(f"| {i} | {m.file} | {m.name} | {tests} | {'caught' if caught else 'MISSED'}"
              f"{'' if status == 'failed' or not caught else f' ({status})'} | {secs:.0f} |")
    print(f"\n{len(chosen) - missed} of {len(chosen)} mutations caught, {missed} missed "
          f"({time.time() - t0:.0f} s, {a.jobs} at a time)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
