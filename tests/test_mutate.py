"""tests/mutate.py, the mutation check, kept honest in the fast suite: its list cannot go stale
(every mutation's text is found exactly once, every test it names exists) and its machinery tells a
caught bug from a passing copy. The whole check (every mutation) is too long for CI: the README's
Tests section says how to run it and how long."""
import ast

import pytest

from mutate import MUTATIONS, ROOT, Mutation, apply, check, main, source_files

CORE = {"riel.py", "losses.py", "mef.py", "mel.py", "eval.py", "rollout.py", "verify.py",
        "train.py", "plumbing/premise.py", "data/synthetic.py", "experiments/fair_ablation.py",
        "plumbing/lora.py", "tools/plan.py", "plumbing/guard.py", "plumbing/optim.py", "model.py",
        "plumbing/checkpoint.py", "plumbing/runlog.py", "plumbing/process.py",
        "plumbing/tokenizer.py", "experiments/real_rl.py"}


def test_at_least_forty_mutations_across_the_core():
    assert len(MUTATIONS) >= 40 and {m.file for m in MUTATIONS} == CORE
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS), "names are unique"


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_applies_once_keeps_the_file_valid_python_and_names_existing_tests(
        m, tmp_path):
    text = (ROOT / m.file).read_text()
    assert text.count(m.old) == 1 and m.new != m.old
    mutated = text.replace(m.old, m.new)
    ast.parse(mutated)  # a mutation is a wrong program, not a syntax error
    changed = [a for a, b in zip(text.splitlines(), mutated.splitlines()) if a != b]
    assert len(changed) == 1, "one line changes"
    for t in m.tests:
        path, _, name = t.partition("::")
        assert (ROOT / path).is_file(), t
        assert not name or f"def {name}(" in (ROOT / path).read_text(), t


def test_a_stale_mutation_is_refused(tmp_path):
    (tmp_path / "x.py").write_text("a = 1\na = 1\n")
    with pytest.raises(ValueError, match="2 times"):
        apply(tmp_path, Mutation("twice", "x.py", "a = 1", "a = 2", ()))


def test_the_copy_fails_under_a_mutation_and_passes_without_it():
    files = source_files()
    assert "riel.py" in files and "tests/mutate.py" in files
    m = next(m for m in MUTATIONS if m.name == "k3 sign flipped")
    test = ("tests/test_losses.py::test_k3_value_and_gradient_match_reference",)
    assert check(None, files, test, timeout=300)[0] == "passed"
    assert check(m, files, test, timeout=300)[0] == "failed"


def test_list_prints_every_mutation(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(m.name in out for m in MUTATIONS)
    assert main(["--list", "--only", "no such mutation"]) == 2
