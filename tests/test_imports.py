"""The import graph: no circle, and the training path never stands on a tool or an experiment.

The training path is every *.py at the repository root, data/ and plumbing/; tools/ and experiments/
may import it, never the reverse (train.py loads tools/plan_fit.py only inside --plan and
--micro-batch auto). Imports are read from the source (ast), not by importing: every `import` and
`from ... import`, those inside functions too (a lazy import still ties two files together),
relative ones resolved, and importlib.import_module / __import__ of a constant name. A circle is
reported as the path that closes it.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def core_modules(root=ROOT, packages=("data", "plumbing")) -> dict:
    """{dotted module name: path} of the training path under root (add "tools" for the tools)."""
    mods = {p.stem: p for p in root.glob("*.py")}
    for pkg in packages:
        for p in (root / pkg).glob("*.py"):
            mods[pkg if p.stem == "__init__" else f"{pkg}.{p.stem}"] = p
    return mods


def imported_names(source: str, module: str, is_package=False) -> set:
    """Every dotted name `source` (the text of `module`) imports, at any depth; `from X import a`
    gives X.a too (a may be a submodule)."""
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
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return {n for n in names if n}


def import_graph(mods: dict) -> dict:
    """{module: the modules of `mods` it imports}. A dotted name points at its longest prefix in
    mods: `import data.gsm8k` is an edge to data.gsm8k, `from data import experts` one to data (a
    submodule's own package is not an edge: Python runs the package first, whoever imports it)."""
    graph = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(path.read_text(), name, path.name == "__init__.py"):
            parts = imported.split(".")
            prefixes = (".".join(parts[:k]) for k in range(len(parts), 0, -1))
            hit = next((p for p in prefixes if p in mods), None)
            if hit is not None and hit != name:
                targets.add(hit)
        graph[name] = targets
    return graph


def find_cycle(graph: dict) -> list | None:
    """A circle of `graph` as [a, b, ..., a], or None. Depth-first; a node met again while on the
    path closes one."""
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


# ---- the checker on graphs and sources made to fail ---------------------------------------------

def test_find_cycle_finds_a_circle_and_only_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    diamond = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}
    assert find_cycle(diamond) is None  # a diamond: no circle


def test_lazy_relative_and_dynamic_imports_are_edges(tmp_path):
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    import b  # lazy\n")
    (tmp_path / "b.py").write_text("from data import experts\n")
    dynamic = "import importlib\nimportlib.import_module('experiments.plot')\n"
    (tmp_path / "c.py").write_text(dynamic)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("from .common import x\nfrom . import gsm8k\n")
    (tmp_path / "data" / "common.py").write_text("def g():\n    from a import f\n")
    (tmp_path / "data" / "gsm8k.py").write_text("from .common import x\n")
    graph = import_graph(core_modules(tmp_path))
    assert graph == {"a": {"b"}, "b": {"data"}, "c": set(),
                     "data": {"data.common", "data.gsm8k"}, "data.common": {"a"},
                     "data.gsm8k": {"data.common"}}
    assert find_cycle(graph) == ["a", "b", "data", "data.common", "a"]
    assert "experiments.plot" in imported_names((tmp_path / "c.py").read_text(), "c")


# ---- the repository ------------------------------------------------------------------------------

LAZY_TOOLS = {("train", "tools.plan_fit")}  # inside `if cfg.plan` / `micro_batch == "auto"` only


def test_no_circle_among_the_training_path_and_the_tools():
    graph = import_graph(core_modules(packages=("data", "plumbing", "tools")))
    assert {"rollout", "plumbing.dist"} <= graph["riel"]  # the graph is read at all
    assert "tools.plan" in graph["tools.plan_fit"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_training_path_never_imports_tools_or_experiments():
    offenders = {(name, n) for name, path in core_modules().items()
                 for n in imported_names(path.read_text(), name, path.name == "__init__.py")
                 if n.split(".")[0] in ("tools", "experiments") and n != "tools"}
    assert offenders == LAZY_TOOLS, "the training path imports a tool or an experiment"
    body = ast.parse((ROOT / "train.py").read_text()).body
    top = [n for n in body if isinstance(n, ast.ImportFrom)]
    assert not [n for n in top if n.module == "tools"], "train.py imports the planner at load time"


def room(module: str) -> str:
    """A folder is one room (data/, plumbing/, tools/): its files import each other freely."""
    return module.split(".")[0]


def room_graph(packages=("data", "plumbing", "tools")) -> dict:
    graph = {}
    for name, targets in import_graph(core_modules(packages=packages)).items():
        outside = {room(t) for t in targets if room(t) != room(name)}
        graph.setdefault(room(name), set()).update(outside)
    return graph


def test_the_rooms_form_layers_and_train_stands_at_most_5_deep():
    """Between rooms no circle (so no arrow runs back up a layer), and train.py's longest chain of
    project imports, with the lazy planner left out, is at most 5 rooms deep."""
    graph = room_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "rooms import each other: " + " -> ".join(cycle)
    assert "plumbing" in graph["model"] and "losses" in graph["riel"]  # the graph is read at all
    graph["train"] = graph["train"] - {"tools"}

    def depth(node):
        return max((1 + depth(n) for n in graph[node]), default=0)
    assert depth("train") <= 5, "train.py stands on a chain of more than 5 rooms"


def test_import_train_loads_no_tool_or_experiment():
    import subprocess
    import sys
    code = ("import sys, train; print(sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('tools', 'experiments')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_at_most_10_python_files_at_the_top_and_no_source_file_over_400_lines():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    card = {"train.py", "mef.py", "riel.py", "model.py", "rollout.py", "verify.py"}
    assert len(top) <= 10 and card <= set(top)
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if p.relative_to(ROOT).parts[0] not in ("tests", "experiments", ".git")
            and (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines: {long}"
