"""The documentation: every public name documented and in the API reference, the CLI reference rendered from the
parsers, every page of the site present, no path of one machine in the pages."""
from __future__ import annotations

import ast
import importlib
import inspect
import sys
from pathlib import Path

import pytest

import discvae

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def test_every_public_name_has_a_docstring_and_is_in_the_api_reference():
    api = (DOCS / "reference" / "api.md").read_text()
    for name in discvae.__all__:
        module = discvae._EXPORTS[name]
        assert f"::: discvae.{module}.{name}\n" in api, name
        obj = getattr(discvae, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"
        else:  # data: a docstring right after its assignment (what mkdocstrings shows)
            body = ast.parse(inspect.getsource(importlib.import_module(f"discvae.{module}"))).body
            at = next(i for i, node in enumerate(body) if isinstance(node, ast.Assign)
                      and any(getattr(t, "id", None) == name for t in node.targets))
            after = body[at + 1] if at + 1 < len(body) else None
            assert isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(
                after.value.value, str) and after.value.value.strip(), f"{name} has no docstring"


def test_the_cli_reference_renders_every_subcommand_from_the_parser():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from mkdocs_hooks import MARKER, cli_reference, on_page_markdown
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert MARKER in (DOCS / "reference" / "cli.md").read_text()
    text = cli_reference()
    from discvae.cli import build_parser
    names = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    assert all(f"## discvae {name}\n" in text for name in names)
    assert "--threads THREADS" in text and "--latent-dim LATENT_DIM" in text
    assert on_page_markdown(f"x\n{MARKER}\n", None, None, None).count("## discvae ") == len(names)


def test_every_page_of_the_site_exists_and_no_page_names_this_machine():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", ""))

    def pages(nav):
        for item in nav:
            for value in item.values():
                yield from pages(value) if isinstance(value, list) else [value]
    listed = list(pages(config["nav"]))
    assert all((DOCS / page).is_file() for page in listed), listed
    assert {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} == set(listed)
    for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]:
        assert "/work/" not in page.read_text(), page


def test_the_results_pages_open_with_a_summary_table():
    for name in ("RESULTS.md", "ESTIMATORS.md", "APPLICATIONS.md"):
        text = (DOCS / name).read_text()
        first_section = text.index("\n## ")
        assert "\n| " in text[:first_section] and "|---" in text[:first_section], name
