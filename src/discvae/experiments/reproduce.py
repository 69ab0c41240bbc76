"""``discvae reproduce``: the experiment grid of Bartler et al. (2019), section VI, and its ``report.md``.

Each model trains in ``OUT/<name>`` with the paper's settings (importance estimator with xi = eta and M = 1, Adam
with lr 1e-3, batch 2048, seed 0, grey values with a Bernoulli likelihood), PyTorch's default initialisation for
the FC models and He's for the CNNs (which collapse at the default). A run directory that already holds a
checkpoint is resumed, so an interrupted or separately started run is picked up; ``epochs`` is the number each run
is trained to at least (a run already past it is evaluated as it is); do not point it at a run another process is
still training. Each run is then evaluated (``eval.json``, reused while it matches the checkpoint's epoch), the
figures of every dataset group are drawn into ``OUT/figures/<group>/`` and ``OUT/report.md`` tabulates the final
metrics and embeds the figures.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import MISSING
from pathlib import Path

from ..config import Config
from ..errors import InputError
from ..evaluation import EVAL, evaluate_run
from ..flags import Flag, documented, setting
from ..runs import CHECKPOINT, check_output, load_checkpoint, write_text
from ..training import train

# the initialisation, which the paper does not state: PyTorch's default for the FC models; He for the CNNs, which
# collapse at PyTorch's default (and at Keras' Glorot) and train with He (docs/RESULTS.md, last section)
FC, CNN = {"arch": "fc", "init": "torch"}, {"arch": "cnn", "init": "he"}
# name -> (figure group, its dataset, architecture, initialisation and latent); the rest is PAPER
GRID = {
    "fc_bvae_mnist": ("mnist", {"dataset": "mnist", **FC, "latent": "bernoulli", "latent_dim": 50}),
    "fc_cvae_mnist": ("mnist", {"dataset": "mnist", **FC, "latent": "categorical", "latent_dim": 100}),
    "cnn_bvae_mnist": ("mnist", {"dataset": "mnist", **CNN, "latent": "bernoulli", "latent_dim": 50}),
    "cnn_cvae_mnist": ("mnist", {"dataset": "mnist", **CNN, "latent": "categorical", "latent_dim": 100}),
    "fc_bvae_fashion": ("fashion", {"dataset": "fashion-mnist", **FC, "latent": "bernoulli", "latent_dim": 50}),
}
PAPER = {"estimator": "importance", "estimator_options": {"num_samples": 1}, "estimator_schedule": {},
         "groups": 1, "capacity": {}, "batch_size": 2048, "lr": 1e-3, "seed": 0, "binarize": "none",
         "likelihood": "bernoulli"}
REPORT = "report.md"
# the settings the grid fixes, no flags of reproduce (its own --dataset replaces every model's; capacity_gamma is
# meaningless without a capacity)
FIXED = ("out", "capacity_gamma", *PAPER, *{key for _, fields in GRID.values() for key in fields})


@documented
@dataclasses.dataclass
class Reproduction:
    """What ``reproduce`` does besides training the grid (whose other settings are the base :class:`Config`)."""

    out: str = setting(MISSING, Flag("folder of the runs and the report"))
    only: str | None = setting(None, Flag("comma-separated subset of the models"))
    dataset: str | None = setting(None, Flag("run every model on the embedded 8x8 digits (quick)", choices=("digits",)))
    k: int = setting(1000, Flag("IWAE samples"))
    chunk: int = setting(100, Flag("IWAE samples drawn at a time"))
    reevaluate: bool = setting(False, Flag("evaluate again even if eval.json is current"))


def select(only: str | None) -> list[str]:
    """The grid members named in the comma-separated ``only`` (all when None), in grid order."""
    if not only:
        return list(GRID)
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in GRID]
    if unknown or not wanted:
        raise InputError(f"unknown model {', '.join(unknown) or repr(only)} in only; choose from {', '.join(GRID)}",
                         "only")
    return [name for name in GRID if name in wanted]


def config(name: str, base: Config, settings: Reproduction) -> Config:
    """The paper's configuration of grid member ``name`` in ``settings.out/name``: ``base`` with the settings the
    grid fixes; ``settings.dataset`` replaces its dataset."""
    dataset = {"dataset": settings.dataset} if settings.dataset else {}
    return dataclasses.replace(base, **{**PAPER, **GRID[name][1], **dataset, "out": str(Path(settings.out) / name)})


def current_evaluation(run: Path, epoch: int) -> dict | None:
    """``eval.json`` of ``run`` if it was computed for the checkpoint's ``epoch``, else None (also when it is
    unreadable: it is then computed again)."""
    try:
        saved = json.loads((run / EVAL).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    current = isinstance(saved, dict) and saved.get("epoch") == epoch and isinstance(saved.get("test"), dict)
    return saved if current else None


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def report_table(results: dict[str, dict]) -> str:
    """The Markdown table of the final test metrics of each model (``results``: name -> eval.json)."""
    head = ("| model | epochs | train time | test -ELBO | E ln p(x\\|z) | KL | IWAE bound ln p(x) (K) | exact ln p(x) "
            "| active units | used categories | H(q(z\\|x)) bits | H(q(z)) bits | eval time |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for name, r in results.items():
        t = r["test"]
        used = t.get("used_categories")
        lines.append(
            f"| {name} | {r['epoch']} | {r['train_seconds'] / 60:.1f} min | {_fmt(t['neg_elbo'])} | "
            f"{_fmt(t['expected_ll'])} | {_fmt(t['kl'])} | {_fmt(t['iwae'])} ({r['k']}) | "
            f"{_fmt(t.get('exact_log_px'))} | {t['active_units']} | {'-' if used is None else used} | "
            f"{_fmt(t.get('posterior_entropy_bits'))} | {_fmt(t.get('aggregate_entropy_bits'))} | "
            f"{t['seconds'] / 60:.1f} min |")
    return head + "\n".join(lines) + "\n"


def write_report(out: Path, results: dict[str, dict], figures: dict[str, list[Path]], command: str) -> Path:
    """``out/report.md``: the command, the metrics table and every figure, embedded by relative path."""
    text = [f"# Reproduction of Bartler et al. (2019)\n\nProduced by `{command}`.\n",
            "Test-set metrics in nats per image (ln p(x) bounds: higher is better; -ELBO: lower is better); train "
            "time is the optimisation wall time. Active units: Var_x E_q[z_i|x] > 0.01 (Burda et al. 2016); used "
            "categories: aggregate posterior mass above 1/(10c). H(q(z)) is exact for one categorical group and "
            "the sum of the per-bit marginal entropies (an upper bound) for Bernoulli bits.\n",
            report_table(results)]
    for group, paths in figures.items():
        text.append(f"\n## {group}\n")
        text += [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in paths]
    return write_text(out / REPORT, "\n".join(text))


def reproduce(base: Config, settings: Reproduction, progress: bool = True,
              command: str = "discvae reproduce") -> Path:
    """Train (or resume), evaluate and plot the selected grid members.

    Args:
        base: the settings of every run that the grid does not fix (``FIXED``): ``epochs`` (each run is trained to
            at least this many), ``data_dir``, ``grad_var_every``, ``device``, ...
        settings: the report directory, the models, the evaluation.
        progress: show progress bars.
        command: the command line named in the report.

    Returns:
        The path of ``report.md``.
    """
    from ..figures import plot_runs

    out = check_output(settings.out)
    names = select(settings.only)
    configs = {name: config(name, base, settings).check() for name in names}
    results = {}
    for name, cfg in configs.items():
        run = Path(cfg.out)
        done = load_checkpoint(run)["epoch"] if (run / CHECKPOINT).is_file() else None
        if done is None or done < cfg.epochs:
            print(f"{name}: {'training' if done is None else f'resuming at epoch {done}'} to {cfg.epochs} epochs "
                  f"in {run}", flush=True)
            done = train(cfg, resume=done is not None, progress=progress).epoch
        results[name] = None if settings.reevaluate else current_evaluation(run, done)
        if results[name] is None:
            print(f"{name}: evaluating (K = {settings.k})", flush=True)
            results[name] = evaluate_run(run, settings.k, settings.chunk)
    figures = {}
    for group in dict.fromkeys(GRID[name][0] for name in names):
        runs = [configs[name].out for name in names if GRID[name][0] == group]
        figures[group] = plot_runs(runs, out / "figures" / group)
    return write_report(out, results, figures, command)
