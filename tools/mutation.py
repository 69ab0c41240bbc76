"""Mutation testing of discvae with mutmut 3 (not in CI: hours of CPU).

    pip install mutmut==3.8.1
    nice -n 10 python tools/mutation.py estimators --out /tmp/discvae-mutation

copies src/, tests/ and pyproject.toml into ``--out`` (the checkout is never touched), writes the [mutmut] section
of a setup.cfg there (the modules to mutate, the test files that exercise them, a fork server because torch is not
fork-safe after use) and runs ``mutmut run --max-children JOBS`` (``--jobs``, 1 by default). mutmut leaves
decorated functions alone, so in the copy ``@_posterior_as_family`` (every estimator of estimators.py) becomes
``name = _posterior_as_family(name)`` after the function, which is the same thing; ``mutmut results`` and
``mutmut show NAME`` in ``--out`` then list the survivors. A rerun in the same ``--out`` resumes (mutmut caches
every verdict); ``--recheck`` reruns a finished run's survivors against today's code and tests, ``--table`` lists
them as Markdown rows. Why mutmut: docs/MUTATION.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESTIMATOR_TESTS = ["test_estimator_formulas.py", "test_estimator_values.py", "test_estimators_strong.py",
                   "test_estimators_frontier.py", "test_estimators.py", "test_unbiasedness.py", "test_hybrid.py",
                   "test_mixture.py", "test_learned_prior.py"]  # cheapest first (--recheck runs them in order)
TESTS = {  # module (under src/discvae) -> the test files that exercise it
    "estimators": ESTIMATOR_TESTS,
    "distributions": ["test_distributions.py", *ESTIMATOR_TESTS],
    "latents": ["test_latents.py", "test_hybrid.py", "test_mixture.py", "test_learned_prior.py", "test_models.py"],
    "models": ["test_models.py", "test_hybrid.py", "test_consistency.py"],
    "evaluation": ["test_evaluation.py", "test_learned_prior.py", "test_mixture.py", "test_hybrid.py",
                   "test_speed.py"],
    "applications/*": ["test_retrieval.py", "test_clustering.py", "test_codes.py", "test_search.py"],
}


# test files left out of a module's ``mutmut run``, for time; ``--recheck`` runs them on every survivor. mutmut's
# first pass traces every call to map tests to functions (with distributions.py traced, test_estimators_frontier.py
# took 91 min there, under a minute plain), and a surviving mutant reruns every test that reaches it: with the
# statistical tests of test_unbiasedness.py and test_hybrid.py (40 s plain) a distributions survivor took minutes
SLOW_UNDER_MUTMUT = {"distributions": ["test_estimators_frontier.py", "test_unbiasedness.py", "test_hybrid.py"]}


def undecorate(path: Path, decorator: str = "_posterior_as_family") -> None:
    """``@decorator`` over a top-level function of ``path`` rewritten as ``name = decorator(name)`` after it."""
    out, pending, decorated = [], None, False
    for line in path.read_text().splitlines(keepends=True):
        if line.strip() == f"@{decorator}":
            decorated = True
            continue
        if pending and line.strip() and not line[0].isspace():
            out += [f"{pending} = {decorator}({pending})\n", "\n\n"]
            pending = None
        if decorated and (match := re.match(r"def (\w+)\(", line)):
            pending, decorated = match.group(1), False
        out.append(line)
    path.write_text("".join(out) + (f"\n\n{pending} = {decorator}({pending})\n" if pending else ""))


QUICK = {  # module -> the tests --recheck runs first (seconds; most survivors die here), before the whole selection
    "estimators": ["test_estimator_formulas.py", "test_estimator_values.py",
                   "test_estimators_strong.py::test_input_errors_say_what_is_wrong_in_full",
                   "test_estimators_strong.py::test_defaults_are_the_documented_ones",
                   "test_estimators_strong.py::test_disarm_value_is_the_mean_over_its_pairs",
                   "test_estimators_strong.py::test_straight_through_forward_passes_decode_exact_samples",
                   "test_estimators_frontier.py::test_gibbs_stein_closed_forms_match_the_definition_and_have_mean_zero",
                   "test_estimators_frontier.py::test_a_batch_of_one_has_no_coefficient_to_fit_and_is_rloo",
                   "test_estimators_frontier.py::test_categorical_and_single_sample_are_refused_in_one_line",
                   "test_estimators_frontier.py::test_two_evaluations_of_f_by_default"],
    "distributions": ["test_distributions.py", "test_estimator_formulas.py", "test_estimator_values.py"],
    "evaluation": ["test_evaluation.py"],
    "latents": ["test_latents.py"],
    "models": ["test_models.py"],
}  # else the test file of the mutant's source file (test_search.py for applications/search.py), if any


def function_span(source: str, qualname: str) -> tuple[int, int]:
    """Where ``def f`` (a top-level function) or ``Class.f`` (a method), with its decorators, starts and ends in
    ``source``; -1 if absent."""
    *owner, name = qualname.split(".")
    found = re.search(rf"^class {owner[0]}\b", source, re.M) if owner else None
    if owner and not found:
        return -1, -1
    indent = "    " if owner else ""
    start = definition = source.find(f"\n{indent}def {name}(", found.start() if found else 0)
    if start < 0:
        return -1, -1
    while source.rfind("\n", 0, start) >= 0 and source[source.rfind("\n", 0, start) + 1:].startswith(f"{indent}@"):
        start = source.rfind("\n", 0, start)  # its decorators belong to it (mutmut's diff shows them as context)
    ends = [source.find(marker, definition + 1)
            for marker in (f"\n{indent}def ", f"\n{indent}@", "\nclass ", "\ndef ")]
    return start + 1, min([e for e in ends if e > 0], default=len(source))


MUTMUT = [sys.executable, "-m", "mutmut"]


def mutmut_output(out: Path, *args: str) -> str:
    """What ``mutmut ARGS`` prints in the run directory ``out``."""
    return subprocess.run([*MUTMUT, *args], cwd=out, capture_output=True, text=True).stdout


def survivors(out: Path, pending: bool = False) -> dict[str, str]:
    """The mutants of the run in ``out`` that survived or that no selected test reached (and, with ``pending``,
    those the run has not reached yet), each with that state."""
    listing = mutmut_output(out, "results", "--all", "true")
    states = "survived|no tests" + ("|not checked" if pending else "")
    return dict(re.findall(rf"^\s*(\S+): ({states})$", listing, re.M))


def change(diff: str) -> str:
    """The first line a mutant adds, from ``mutmut show``'s diff, stripped, cut to 90 characters and with its
    ``|`` escaped (a Markdown table's cell)."""
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    text = added[0] if added else "(a line removed)"
    return (text if len(text) <= 90 else text[:87] + "...").replace("|", "\\|")


def verdict(state: str, logged: str, given: str = "") -> tuple[str, str]:
    """(verdict, the test that kills it or why it stands) of one survivor: ``given`` first (the verdicts file's
    ``equivalent: WHY``, ``cosmetic: WHY`` or ``killed now: TEST``, a verdict reached by hand), else its
    ``--recheck`` log's words (``KILLED TEST``: killed now), else it survives."""
    if given:
        kind, _, why = given.partition(": ")
        return kind, why
    if logged.startswith("KILLED"):
        return "killed now", logged.removeprefix("KILLED").strip().removeprefix("tests/") or "(recheck)"
    if "timeout" in state:
        return "detected", "timeout"
    return "**survives**", logged or "not rechecked"


def table(out: Path, logged: dict[str, str], given: dict[str, str]) -> None:
    """A Markdown row per survivor of the run in ``out`` -- and per mutant it had not reached that the ``--recheck
    --pending`` logs say survived --: its name below ``discvae.`` (the file's module first, so that functions of
    the same name in two files stay apart), its state in the run, what it changes, and its ``verdict`` from the
    ``--recheck`` logs (``logged``: mutant name -> the log's words) and the verdicts file (``given``: name below
    ``discvae.`` -> verdict); then the count of each verdict."""
    print("| mutant | in the run | the change | verdict | the test that kills it, or why it stands |\n"
          "|---|---|---|---|---|")
    counts = {}
    for name, state in survivors(out, pending=True).items():
        if state == "not checked" and not logged.get(name, "").startswith("SURVIVED"):
            continue
        short = name.removeprefix("discvae.")
        kind, why = verdict(state, logged.get(name, ""), given.get(short, ""))
        counts[kind] = counts.get(kind, 0) + 1
        print(f"| `{short}` | {state} | `{change(mutmut_output(out, 'show', name))}` | {kind} | {why} |")
    print("\n" + ", ".join(f"{kind}: {n}" for kind, n in counts.items()))


def hunk(diff: list[str], indent: str = "", within: str | None = None) -> tuple[str, str]:
    """The text before and after a mutant, from the lines of ``mutmut show``'s one-hunk diff (each line prefixed by
    ``indent``), with the fewest context lines around the change that make it occur once in ``within`` (the
    function as it is today: a line that occurs twice in it, ``"prior")``, still has one place, and edits elsewhere
    in the function since the run do not matter); with all the hunk's context lines when ``within`` is None."""
    body = diff[next(i for i, line in enumerate(diff) if line.startswith("@@")) + 1:]
    changed = [i for i, line in enumerate(body) if line[:1] in ("-", "+")]
    lo, hi = (changed[0], changed[-1] + 1) if within is not None else (0, len(body))
    while True:
        old, new = ("\n".join(indent + line[1:] if line[1:] else "" for line in body[lo:hi]
                              if line[:1] in ("", " ", sign)) for sign in ("-", "+"))
        if within is None or within.count(old) == 1 or (lo, hi) == (0, len(body)):
            return old, new
        lo, hi = max(lo - 1, 0), min(hi + 1, len(body))


def recheck(out: Path, module: str, skip: set[str], pending: bool = False, only: list[str] = (),
            quick_only: bool = False) -> None:
    """Each survivor of the finished run in ``out`` (and each mutant no selected test reached) against the current
    code and tests: mutmut's diff of it (one function's lines) applied to that function in a copy of today's source
    file (the one the mutant's name gives, e.g. ``discvae.applications.search.x_f__mutmut_3``), then the module's
    test files with ``-x`` (its ``QUICK`` tests first, else the test file named after the source file); prints
    ``NAME KILLED TEST`` or ``NAME SURVIVED`` (``NOT-APPLIED`` when the function changed since). Faster than a
    fresh run: no mutant generation, no coverage pass, only the survivors. With ``pending``, also the mutants a
    stopped run had not reached: a run stuck on a function every test reaches finishes faster this way, the QUICK
    tests killing most mutants in seconds. With ``quick_only``, only those first tests: SURVIVED then means that
    they do not kill it (enough when the tests added since the run are all there)."""
    copy = Path(tempfile.mkdtemp(prefix="recheck-", dir=out))  # its own: rechecks side by side do not mix mutants
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__"))
    tests = [str(ROOT / "tests" / t) for t in TESTS[module]]
    names = [n for n in survivors(out, pending) if n.split(".")[-1] not in skip]
    try:
        for name in [n for n in names if not only or any(fnmatch.fnmatch(n, pattern) for pattern in only)]:
            dotted, function = re.match(r"(.*?)\.x[_ǁ](.+?)__mutmut_\d+$", name).groups()
            function = function.replace("ǁ", ".")
            relative = Path(*dotted.split(".")).with_suffix(".py")
            source, target = (ROOT / "src" / relative).read_text(), copy / "src" / relative
            start, end = function_span(source, function)
            indent = "    " if "." in function else ""  # mutmut shows a method dedented to the class's level
            old, new = hunk(mutmut_output(out, "show", name).splitlines(), indent, source[start:end])
            if start < 0 or source[start:end].count(old) != 1:
                print(name, "NOT-APPLIED", flush=True)
                continue
            target.write_text(source[:start] + source[start:end].replace(old, new) + source[end:])
            quick = QUICK.get(module) or [t for t in [f"test_{relative.stem}.py"] if (ROOT / "tests" / t).is_file()]
            first = [str(ROOT / "tests" / t) for t in quick] or tests
            for selection in [first] if quick_only or first == tests else [first, tests]:
                run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *selection],
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(copy / "src")}, capture_output=True,
                                     text=True)
                if run.returncode:
                    break
            target.write_text(source)
            failed = re.findall(r"^FAILED (\S+)", run.stdout, re.M)
            print(name, *(["KILLED", *failed[:1]] if run.returncode else ["SURVIVED"]), flush=True)
    finally:
        shutil.rmtree(copy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", choices=sorted(TESTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/discvae-mutation"))
    parser.add_argument("--only", nargs="*", default=[], help="mutant names or globs for mutmut run "
                        "(and --recheck), e.g. 'discvae.estimators.x_importance*' (default: every mutant)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at a time (mutmut's --max-children; "
                        "default 1, one core: the other stays free)")
    parser.add_argument("--recheck", action="store_true", help="instead of running mutmut: each survivor of the "
                        "finished run in --out against today's code and tests (see recheck)")
    parser.add_argument("--skip", nargs="*", default=[], help="with --recheck: survivors not to rerun (e.g. the "
                        "equivalent ones), by their short name x_..._mutmut_N")
    parser.add_argument("--quick-only", action="store_true", help="with --recheck: only the QUICK tests (or the "
                        "test file named after the mutant's source file), not the whole selection")
    parser.add_argument("--pending", action="store_true", help="with --recheck: also the mutants a stopped run had "
                        "not reached")
    parser.add_argument("--table", nargs="*", type=Path, metavar="RECHECK_LOG", help="instead of running mutmut: "
                        "a Markdown row per survivor of the finished run in --out, with its verdict from these "
                        "--recheck logs (see table)")
    parser.add_argument("--verdicts", type=Path, help="with --table: a JSON file of verdicts reached by hand, "
                        "mutant name below discvae. -> 'equivalent: WHY', 'cosmetic: WHY' or 'killed now: TEST' "
                        "(tools/mutation_verdicts.json)")
    args = parser.parse_args(argv)
    if args.table is not None:
        lines = [line.split(maxsplit=1) for log in args.table for line in log.read_text().splitlines()]
        given = json.loads(args.verdicts.read_text()) if args.verdicts else {}
        table(args.out, {parts[0]: parts[1] for parts in lines if len(parts) == 2}, given)
        return 0
    if args.recheck:
        for module in args.modules:
            recheck(args.out, module, set(args.skip), args.pending, args.only, args.quick_only)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, args.out / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", args.out)
    undecorate(args.out / "src" / "discvae" / "estimators.py")
    tests = sorted({f"tests/{t}" for m in args.modules for t in TESTS[m] if t not in SLOW_UNDER_MUTMUT.get(m, [])})
    mutate = [f"src/discvae/{m}" + ("" if m.endswith("*") else ".py") for m in args.modules]
    lines = ["[mutmut]", "source_paths = src", "only_mutate =", *[f"    {m}" for m in mutate],
             "pytest_add_cli_args_test_selection =", *[f"    {t}" for t in tests],
             "pytest_add_cli_args = -p no:cacheprovider", "process_isolation = forkserver"]
    (args.out / "setup.cfg").write_text("\n".join(lines) + "\n")
    stats = args.out / "mutants" / "mutmut-stats.json"
    if stats.exists() and not json.loads(stats.read_text()).get("tests_by_mangled_function_name"):
        # a first pass stopped before it mapped tests to functions: resumed from it, mutmut would run every
        # mutant against no tests ("no tests") or only against tests added since; start the pass again
        stats.unlink()
    subprocess.run([*MUTMUT, "run", "--max-children", str(args.jobs), *args.only], cwd=args.out, check=False)
    return subprocess.run([*MUTMUT, "results"], cwd=args.out, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
