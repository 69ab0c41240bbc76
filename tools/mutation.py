"""Mutation testing of discvae with mutmut 3 (not in CI: hours of CPU).

    pip install mutmut==3.8.1
    nice -n 10 python tools/mutation.py estimators --out /tmp/discvae-mutation

copies src/, tests/ and pyproject.toml into ``--out`` (the checkout is never touched), writes the [mutmut] section
of a setup.cfg there (the modules to mutate, the test files that exercise them, a fork server because torch is not
fork-safe after use) and runs ``mutmut run --max-children 1``. mutmut leaves decorated functions alone, so in the
copy ``@_posterior_as_family`` (every estimator of estimators.py) becomes ``name = _posterior_as_family(name)``
after the function, which is the same thing; ``mutmut results`` and ``mutmut show NAME`` in
``--out`` then list the survivors. A rerun in the same ``--out`` resumes (mutmut caches every verdict). Why mutmut:
docs/MUTATION.md.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESTIMATOR_TESTS = ["test_unbiasedness.py", "test_estimators.py", "test_estimators_strong.py",
                   "test_estimator_values.py", "test_estimators_frontier.py", "test_estimator_formulas.py",
                   "test_hybrid.py", "test_mixture.py", "test_learned_prior.py"]
TESTS = {  # module (under src/discvae) -> the test files that exercise it
    "estimators": ESTIMATOR_TESTS,
    "distributions": ["test_distributions.py", *ESTIMATOR_TESTS],
    "latents": ["test_hybrid.py", "test_mixture.py", "test_learned_prior.py", "test_models.py"],
    "models": ["test_models.py", "test_hybrid.py", "test_consistency.py"],
    "evaluation": ["test_evaluation.py"],
    "applications/*": ["test_retrieval.py", "test_clustering.py", "test_codes.py"],
}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", choices=sorted(TESTS))
    parser.add_argument("--out", type=Path, default=Path("/tmp/discvae-mutation"))
    parser.add_argument("--only", nargs="*", default=[], help="mutant names or globs for mutmut run, e.g. "
                        "'discvae.estimators.x_importance*' (default: every mutant)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, args.out / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", args.out)
    undecorate(args.out / "src" / "discvae" / "estimators.py")
    tests = sorted({f"tests/{t}" for m in args.modules for t in TESTS[m]})
    mutate = [f"src/discvae/{m}" + ("" if m.endswith("*") else ".py") for m in args.modules]
    lines = ["[mutmut]", "source_paths = src", "only_mutate =", *[f"    {m}" for m in mutate],
             "pytest_add_cli_args_test_selection =", *[f"    {t}" for t in tests],
             "pytest_add_cli_args = -p no:cacheprovider", "process_isolation = forkserver"]
    (args.out / "setup.cfg").write_text("\n".join(lines) + "\n")
    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", "1", *args.only], cwd=args.out, check=False)
    return subprocess.run([*mutmut, "results"], cwd=args.out, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
