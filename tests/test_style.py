"""The house style, enforced: ruff (configured in pyproject.toml: lines <= 100 characters,
pycodestyle, pyflakes) finds nothing; function and class docstrings run at most 6 lines (a module's
may teach longer); tests/test_imports.py counts the lines of each source file."""
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("*.py", "data/*.py", "plumbing/*.py", "tools/*.py")


def test_ruff_finds_nothing():
    found = subprocess.run([sys.executable, "-m", "ruff", "--version"], capture_output=True)
    if shutil.which("ruff") is None and found.returncode != 0:
        pytest.fail("ruff is missing: pip install -r requirements-dev.txt")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def long_docstrings(path: Path, limit: int = 6) -> list:
    """(name, lines) of every class or function docstring in path longer than limit lines."""
    tree = ast.parse(path.read_text())
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for n in nodes:
        doc = ast.get_docstring(n, clean=True)
        if doc and len(doc.strip().splitlines()) > limit and not isinstance(n, ast.Module):
            out.append((getattr(n, "name", "<module>"), len(doc.strip().splitlines())))
    return out


def test_function_and_class_docstrings_run_at_most_6_lines():
    files = [p for pattern in SOURCE for p in sorted(ROOT.glob(pattern))]
    long = {str(p.relative_to(ROOT)): d for p in files if (d := long_docstrings(p))}
    assert not long, f"docstrings over 6 lines: {long}"


def test_the_docstring_check_sees_a_long_one(tmp_path):
    doc = "\n".join("line" for _ in range(8))
    (tmp_path / "x.py").write_text(f'def f():\n    """{doc}"""\n')
    assert long_docstrings(tmp_path / "x.py") == [("f", 8)]
