"""The results pages' main tables come from data: every number of a table marked ``<!-- data: results/NAME.csv -->`` in
docs/RESULTS.md, docs/APPLICATIONS.md and docs/ESTIMATORS.md (every cell of numbers alone) is a value of that file,
so that a table cannot drift from its runs; the data files have the columns run, seed, metric, value, command, and
their commands name no machine's paths. The mutation page's per-module summary agrees with the per-mutant verdicts
in tools/mutation_verdicts.json; the pages stay short enough to read as references."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARK = re.compile(r"^<!-- data: (results/[\w.-]+\.csv) -->$")
# a number not part of a longer one (a range 3.5-3.9 gives 3.5 and 3.9), its sign kept; thousands commas removed first
NUMBER = re.compile(r"(?<![\d.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
COLUMNS = ["run", "seed", "metric", "value", "command"]


def marked_tables(page: Path) -> list[tuple[str, list[list[str]]]]:
    """(data file, the table's body rows as lists of cells) for every table right after a data mark."""
    lines = page.read_text().splitlines()
    tables = []
    for i, line in enumerate(lines):
        mark = MARK.match(line.strip())
        if not mark:
            continue
        start = i + 1
        while start < len(lines) and not lines[start].strip():
            start += 1
        rows = []
        for row in lines[start:]:
            if not row.startswith("|"):
                break
            rows.append(row.strip())
        assert len(rows) > 2 and re.fullmatch(r"[-:| ]+", rows[1]), f"{page.name}: no table after {line}"
        tables.append((mark.group(1), [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]))
    return tables


def numbers(cell: str) -> list[float]:
    text = re.sub(r"\d{4}-\d\d-\d\d", "", cell.replace("±", " ").replace("**", ""))  # dates are not results
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    return [float(n) for n in NUMBER.findall(text)]


def is_numeric(cell: str) -> bool:
    """A cell of results (numbers, a mean ± std, values per seed, a K in brackets), not of words or names."""
    return not re.search(r"[a-df-zA-DF-Z`]", cell) and bool(NUMBER.search(cell))


def read_data(name: str) -> list[dict[str, str]]:
    with open(DOCS / name, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS, name
        return list(reader)


@pytest.mark.parametrize("page", ["RESULTS.md", "APPLICATIONS.md", "ESTIMATORS.md"])
def test_every_number_of_the_main_tables_is_in_the_data(page):
    tables = marked_tables(DOCS / page)
    assert tables, f"{page} marks no table with its data"
    for name, rows in tables:
        values = {float(row["value"]) for row in read_data(name)}
        missing = [(row[0], n) for row in rows for cell in row if is_numeric(cell) for n in numbers(cell)
                   if n not in values]
        assert not missing, f"{page}: numbers of a table marked {name} not in that file: {missing[:10]}"


@pytest.mark.parametrize("name", sorted(p.relative_to(DOCS).as_posix() for p in (DOCS / "results").glob("*.csv")))
def test_the_data_files_have_a_command_for_every_value(name):
    rows = read_data(name)
    assert rows
    for row in rows:
        assert all(row[key].strip() for key in COLUMNS), row
        float(row["value"])
        assert "/work/" not in row["command"] and "/tmp/" not in row["command"] and "/home/" not in row["command"]


def test_the_numbers_helper_reads_cells_as_the_pages_write_them():
    assert numbers("**0.928** ± 0.004 / 0.952") == [0.928, 0.004, 0.952]
    assert numbers("-112.12 (1000)") == [-112.12, 1000.0]
    assert numbers("3.5-3.9 min, 1,961 of 2,019") == [3.5, 3.9, 1961.0, 2019.0]
    assert numbers("+0.22 ± 0.72") == [0.22, 0.72]
    assert numbers("A, 2026-11-24") == []
    assert is_numeric("**0.928** ± 0.004") and is_numeric("-112.12 (1000)") and is_numeric("1.9e-2")
    assert not is_numeric("A, 2026-11-24") and not is_numeric("`--latent-dim 64`") and not is_numeric("-")


def test_the_mutation_summary_matches_the_verdicts_file():
    verdicts = json.loads((ROOT / "tools" / "mutation_verdicts.json").read_text())
    counts: dict[tuple[str, str], int] = {}
    for name, given in verdicts.items():
        kind, _, why = given.partition(": ")
        assert kind in ("equivalent", "cosmetic", "killed now") and why, (name, given)
        module = "applications" if name.startswith("applications.") else name.split(".")[0]
        counts[module, kind] = counts.get((module, kind), 0) + 1
    text = (DOCS / "MUTATION.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) % \|$", text, re.M)
    assert {row[0] for row in rows} == {"estimators", "distributions", "evaluation", "latents", "models",
                                        "applications"}
    for module, mutants, detected, equivalent, cosmetic, score in rows:
        mutants, detected, equivalent, cosmetic = (int(v.replace(",", "")) for v in
                                                   (mutants, detected, equivalent, cosmetic))
        assert counts.get((module, "equivalent"), 0) == equivalent, module
        assert counts.get((module, "cosmetic"), 0) == cosmetic, module
        assert mutants == detected + equivalent + cosmetic, module
        assert float(score) == round(100 * detected / (mutants - equivalent), 1), module


def test_the_reference_pages_stay_short_and_read_as_references():
    for page in DOCS.rglob("*.md"):
        if page.name != "ESTIMATORS.md":
            assert len(page.read_text()) <= 20_000, page
    assert len((ROOT / "benchmarks" / "README.md").read_text()) <= 15_000
    for page in [DOCS / "RESULTS.md", DOCS / "APPLICATIONS.md", DOCS / "MUTATION.md", DOCS / "TESTING.md",
                 ROOT / "benchmarks" / "README.md", ROOT / "CHANGELOG.md"]:
        text = page.read_text()
        assert not re.search(r"session", text, re.I), page  # no lab notebook: no sessions, no issue numbers
        assert not re.search(r"\bissues? \d", text, re.I), page
