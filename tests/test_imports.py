"""The core's import graph: no circle among the core modules, and the core never imports experiments/.

The core is every *.py at the repository root and data/*.py; experiments/ may import the core, never the reverse.
Imports are read from the source (ast), not by importing: every `import` and `from ... import`, including those
inside functions (a lazy import still ties two files together), relative ones resolved, and
importlib.import_module / __import__ of a constant name. A circle is reported as the path that closes it.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def core_modules(root=ROOT) -> dict:
    """{dotted module name: path} of the core under root."""
    mods = {p.stem: p for p in root.glob("*.py")}
    for p in (root / "data").glob("*.py"):
        mods["data" if p.stem == "__init__" else f"data.{p.stem}"] = p
    return mods


def imported_names(source: str, module: str, is_package=False) -> set:
    """Every dotted name `source` (the text of `module`) imports, at any depth; `from X import a` gives X.a too
    (a may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{a.name}" if base else a.name for a in node.names}
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return {n for n in names if n}


def import_graph(mods: dict) -> dict:
    """{module: the modules of `mods` it imports}. A dotted name points at its longest prefix in mods: `import
    data.gsm8k` is an edge to data.gsm8k, `from data import experts` one to data (a submodule's own package is
    not an edge: Python runs the package first, whoever imports it)."""
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(path.read_text(), name, path.name == "__init__.py"):
            parts = imported.split(".")
            hit = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in mods), None)
            if hit is not None and hit != name:
                targets.add(hit)
        graph[name] = targets
    return graph


def find_cycle(graph: dict) -> list | None:
    """A circle of `graph` as [a, b, ..., a], or None. Depth-first; a node met again while on the path closes one."""
    done, path, on_path = set(), [], set()

    def visit(node):
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        on_path.discard(path.pop())
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start)):
            return found
    return None


# ---- the checker on graphs and sources made to fail ---------------------------------------------------------

def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None  # a diamond: no circle


def test_lazy_relative_and_dynamic_imports_are_edges(tmp_path):
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    import b  # lazy\n")
    (tmp_path / "b.py").write_text("from data import experts\n")
    (tmp_path / "c.py").write_text("import importlib\nimportlib.import_module('experiments.plot')\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("from .common import x\nfrom . import gsm8k\n")
    (tmp_path / "data" / "common.py").write_text("def g():\n    from a import f\n")
    (tmp_path / "data" / "gsm8k.py").write_text("from .common import x\n")
    graph = import_graph(core_modules(tmp_path))
    assert graph == {"a": {"b"}, "b": {"data"}, "c": set(), "data": {"data.common", "data.gsm8k"},
                     "data.common": {"a"}, "data.gsm8k": {"data.common"}}
    assert find_cycle(graph) == ["a", "b", "data", "data.common", "a"]
    assert "experiments.plot" in imported_names((tmp_path / "c.py").read_text(), "c")


# ---- the repository ---------------------------------------------------------------------------------------

def test_no_circle_among_core_modules():
    graph = import_graph(core_modules())
    assert {"rollout", "plan_fit"} <= graph["train"] and "plan" in graph["plan_fit"] and "rollout" in graph["riel"]  # the graph is read at all
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in the core: " + " -> ".join(cycle)


def test_core_never_imports_experiments():
    offenders = {name: sorted(n for n in imported_names(path.read_text(), name, path.name == "__init__.py")
                              if n == "experiments" or n.startswith("experiments."))
                 for name, path in core_modules().items()}
    assert not {k: v for k, v in offenders.items() if v}, "the core imports experiments/ (move the code to the core)"
