"""What the package shows its users: imports without side effects, its public names, its typing marker."""
import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import discvae

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(discvae.__file__).parent


def run_python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (with this one's environment plus ``env``); it prints one JSON line."""
    import os

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_package_and_building_the_cli_imports_neither_matplotlib_nor_more():
    seen = run_python("import json, sys\n"
                      "import discvae\n"
                      "bare = sorted(m.split('.')[0] for m in sys.modules if m.startswith(('torch', 'matplotlib')))\n"
                      "import discvae.cli\n"
                      "discvae.cli.build_parser()\n"
                      "print(json.dumps({'bare': bare, 'cli': [m for m in sys.modules if 'matplotlib' in m]}))")
    assert seen == {"bare": [], "cli": []}


def test_drawing_sets_no_matplotlib_backend_and_leaves_pyplot_alone(tmp_path):
    seen = run_python("import json, sys, matplotlib\n"
                      "from discvae.figures import save_figure, subplots\n"
                      "fig, ax = subplots(figsize=(2, 2), dpi=50)\n"
                      "ax.plot([0, 1], [1, 0])\n"
                      f"save_figure({str(tmp_path / 'f.png')!r}, fig)\n"
                      "print(json.dumps({'backend': dict.__getitem__(matplotlib.rcParams, 'backend'),\n"
                      "                  'pyplot': 'matplotlib.pyplot' in sys.modules}))", MPLBACKEND="svg")
    assert seen == {"backend": "svg", "pyplot": False}
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_lists_the_names_the_readme_docs_and_examples_import_and_each_resolves():
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in (ROOT / "docs").rglob("*.md")),
             *(p.read_text() for p in (ROOT / "examples").glob("*.py"))]
    used = {name.strip() for text in texts for names in re.findall(r"^from discvae import (.+)$", text, re.M)
            for name in names.split(",")}
    assert used and used <= set(discvae.__all__)
    for name in discvae.__all__:
        assert getattr(discvae, name) is getattr(importlib.import_module(f"discvae.{discvae._EXPORTS[name]}"), name)
    # type checkers see the same names as the lazy imports give (the TYPE_CHECKING block of __init__.py)
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    checked = {alias.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
               for alias in node.names}
    assert checked == discvae._EXPORTS and set(checked) == set(discvae.__all__)


def test_the_package_is_marked_typed_and_ships_the_marker():
    tomllib = pytest.importorskip("tomllib")
    assert (PACKAGE / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["discvae"]


def module_imports(path: Path) -> set[str]:
    """The discvae modules that the module at ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks left
    out), as dotted names."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            for alias in node.names:  # `from . import x` imports the module x
                full = f"{target}.{alias.name}"
                found.add(full if (PACKAGE.parent / Path(*full.split("."))).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)
    visit(ast.parse(path.read_text()))
    return {m for m in found if m.startswith("discvae")}


def test_the_modules_import_each_other_without_a_cycle():
    graph = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
             module_imports(p) for p in PACKAGE.rglob("*.py")}
    assert "discvae.config" in graph["discvae.training"] and "discvae.training" not in graph["discvae.callbacks"]
    done, path = set(), []

    def walk(module):
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported != "discvae":  # the package's face imports nothing at run time (__getattr__)
                walk(imported)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        walk(module)


def _mutation_tool():
    """tools/mutation.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("mutation", ROOT / "tools" / "mutation.py")
    mutation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutation)
    return mutation


def test_the_mutation_run_selects_every_test_file_of_a_mutated_module():
    """tools/mutation.py runs a module's mutants against the test files it lists: each file named for the module
    (test_estimator*.py for estimators) must be among them, or its mutants survive tests that would kill them (this
    happened to test_estimators_frontier.py)."""
    mutation = _mutation_tool()
    for module in ("estimators", "distributions", "latents", "models", "evaluation"):
        named = {path.name for path in (ROOT / "tests").glob(f"test_{module[:-1]}*.py")}
        assert named and named <= set(mutation.TESTS[module]), (module, named - set(mutation.TESTS[module]))


def test_the_recheck_mutates_the_method_of_the_named_class():
    """``--recheck`` applies a survivor's diff to one function; methods of the same name in several classes
    (``aggregate`` of Bernoulli and Categorical) must resolve to the named class's."""
    mutation = _mutation_tool()
    source = "class A:\n    def f(self):\n        return 1\n\n    def g(self):\n        return 2\n\n\nclass B(A):\n" \
             "    def f(self):\n        return 3\n\n\ndef f():\n    return 4\n"
    for name, body in (("A.f", "return 1"), ("B.f", "return 3"), ("f", "return 4"), ("A.g", "return 2")):
        start, end = mutation.function_span(source, name)
        assert source[start:end].count("return") == 1 and body in source[start:end], name
    assert mutation.function_span(source, "C.f") == (-1, -1)


def test_the_survivor_table_shows_the_line_a_mutant_adds():
    """``--table`` writes a Markdown row per survivor: the line the mutant adds, cut to 90 characters, its ``|``
    escaped so the row keeps its cells."""
    mutation = _mutation_tool()
    diff = "--- a.py\n+++ a.py\n@@ -1,2 +1,2 @@\n def f(x):\n-    return x | 1\n+    return x | 2\n"
    assert mutation.change(diff) == "return x \\| 2"
    long = "--- a.py\n+++ a.py\n-    y = 1\n+    y = " + "1" * 100 + "\n"
    assert mutation.change(long) == "y = " + "1" * 83 + "..."
    assert mutation.change("--- a.py\n+++ a.py\n-    y = 1\n") == "(a line removed)"


def test_a_survivors_verdict_comes_from_the_hand_first_then_the_recheck():
    mutation = _mutation_tool()
    killed = "KILLED tests/test_a.py::test_b"
    assert mutation.verdict("survived", killed) == ("killed now", "test_a.py::test_b")
    assert mutation.verdict("survived", killed, "equivalent: a default") == ("equivalent", "a default")
    assert mutation.verdict("survived", "SURVIVED", "cosmetic: a figure's size") == ("cosmetic", "a figure's size")
    assert mutation.verdict("survived", "SURVIVED") == ("**survives**", "SURVIVED")
    assert mutation.verdict("survived", "") == ("**survives**", "not rechecked")
    assert mutation.verdict("timeout", "") == ("detected", "timeout")


def test_the_recheck_places_a_mutant_by_its_context():
    """``--recheck`` applies a mutant as the hunk's text with as many of its context lines as make it unique in the
    function today: a changed line that occurs twice (the ``"prior")`` of two refusals) is changed in the one place
    the mutant changed it, and a function edited since the run still takes its mutants."""
    mutation = _mutation_tool()
    diff = ["# name: not checked", "--- a.py", "+++ a.py", "@@ -1,5 +1,5 @@", "     if a:", "         raise E(",
            '-                "prior")', '+                None)', "", "     if b:"]
    old, new = mutation.hunk(diff)
    assert old == '    if a:\n        raise E(\n                "prior")\n\n    if b:'
    assert new == "    if a:\n        raise E(\n                None)\n\n    if b:"
    edited = ('    x = 0\n    if a:\n        raise E(\n                "prior")\n\n    y = 1\n    if b:\n'
              '        raise E("other")\n')  # lines added since the run; "prior" once
    assert mutation.hunk(diff, within=edited) == ('                "prior")', "                None)")
    indented = tuple("\n".join("    " + line if line else "" for line in text.split("\n")) for text in (old, new))
    assert mutation.hunk(diff, "    ", within="") == indented  # not found: the whole hunk, a method's (indented)


def test_a_method_span_holds_its_decorators():
    """mutmut's diff of a decorated method shows the decorator as context: the span must hold it too."""
    mutation = _mutation_tool()
    source = "class A:\n    @classmethod\n    def f(cls):\n        return 1\n\n    @property\n    def g(self):\n" \
             "        return 2\n"
    start, end = mutation.function_span(source, "A.f")
    assert source[start:end] == "    @classmethod\n    def f(cls):\n        return 1\n"
