"""``discvae compare``: several gradient estimators on the same model, data, seed and budget, side by side.

Two measurements, written into one directory (``report.md``, ``bias_variance.png``, ``curves.png``,
``results.json``, and one run directory per estimator under ``runs/``):

1. Bias and variance against the truth. A model of the same architecture and latent family, small enough to enumerate
   (the run's own latent if it has at most ``EXACT_MAX_STATES`` states, else ``bias_latent_dim`` bits or classes), is
   trained briefly with the ``exact`` estimator; on a fixed batch, the exact gradient of the loss (by enumeration)
   is compared with R independent estimates of each estimator: the norm of the mean error over the encoder's (and
   the decoder's) parameters next to its noise floor sqrt(tr Cov / R) (the size an unbiased estimator's mean error
   has from noise alone), and the per-coordinate variance of the encoder gradient, also multiplied by the
   decoder evaluations per data point (variance per function evaluation: lower is better at equal cost).
2. Training curves. Each estimator trains the full model with :func:`discvae.training.train` (same seed, so the
   same initialisation and mini-batch order) for the same number of epochs, in chunks of ``eval_every`` epochs;
   after each chunk the test IWAE bound is measured. Curves of the test negative ELBO, the test IWAE bound and the
   encoder-gradient variance against steps and training wall time, and a final table. ``epochs = 0`` skips this
   stage (bias and variance only).

Equal budget rule: every sampling estimator gets the same number ``M`` of decoder evaluations per data point and
step (``num_samples = M``; ``arm`` and ``disarm`` spend them as M / 2 antithetic pairs; the control-variate
estimators add one backward pass for grad_z f at their M samples; ``rebar`` and ``relax`` evaluate f three times per
sample, which the report's evaluations column counts); ``exact`` decodes each of its S latent states once per batch
(S / batch evaluations per data point). A spec ``NAME:key=value:...`` overrides options, e.g.
``importance:num_samples=1`` (the paper's estimator) or ``gumbel:tau=0.5``. Runs are resumed where they stopped, so
an interrupted comparison can simply be restarted with the same arguments. With several seeds, ``stacked`` trains
each estimator's seeds side by side in one process (:mod:`discvae.stacked`), each run as it would train alone and in
its own directory; its time per step is then the stack's.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING
from pathlib import Path

import numpy as np
import torch

from ..config import Config, estimator_option
from ..data import Dataset, load_dataset
from ..errors import InputError
from ..estimators import EXACT_MAX_STATES, Estimator, exact, make_estimator
from ..evaluation import fixed_binarization, iwae_bound
from ..flags import Flag, documented, setting
from ..gradients import gradient_samples
from ..runs import CHECKPOINT, check_output, load_checkpoint, read_csv, write_csv, write_json, write_text
from ..stacked import check_stackable, train_stacked
from ..training import model_for, train

IWAE_CSV = "iwae.csv"
# the command line's defaults for the base configuration: a quick comparison on the digits at M = 2
BASE_DEFAULTS = {"dataset": "digits", "num_samples": 2, "epochs": 10, "grad_var_every": 5}
# settings of the base configuration that are no flags of compare: each spec names its estimator and options
# (num_samples, their default, is the budget M), and the runs live in the comparison's directory
NOT_FLAGS = ("estimator", "proposal", "baseline", "tau", "estimator_option", "estimator_schedule", "out")
# the measured columns: with several seeds, their mean and standard deviation
BIAS_MEASURES = ("encoder_bias", "encoder_noise_floor", "decoder_bias", "decoder_noise_floor", "encoder_var",
                 "encoder_var_per_eval", "truth_encoder_norm")
FINAL_MEASURES = ("train_neg_elbo", "test_neg_elbo", "test_neg_iwae", "ms_per_step", "train_time", "encoder_var")


@dataclasses.dataclass
class Spec:
    """One estimator of the comparison: its label (the spec text) and the estimator (registered name, options)."""

    label: str
    estimator: Estimator


@documented
@dataclasses.dataclass
class Comparison:
    """What ``compare`` does besides training its runs (whose settings are the base :class:`Config`). With ``seeds``
    empty, the comparison runs with the base configuration's seed, directly in ``out``."""

    out: str = setting(MISSING, Flag("report directory"))
    seeds: list[int] = setting(MISSING, Flag("several seeds: the comparison runs with each (in OUT/seed-N) and the "
                                             "report shows mean ± std over them (default: --seed alone)",
                                             metavar="SEED"), factory=list)
    eval_every: int = setting(5, Flag("epochs between test IWAE bounds"))
    iwae_k: int = setting(100, Flag("samples of the bound during training"))
    iwae_n: int = setting(1000, Flag("test points for it"))
    final_k: int = setting(1000, Flag("samples of the final bound"))
    final_n: int = setting(10000, Flag("test points for it"))
    bias_latent_dim: int = setting(10, Flag("bits/classes of the enumerable bias model when the run's latent is "
                                            "too large"))
    bias_epochs: int = setting(1, Flag("epochs of exact training of it"))
    bias_batch: int = setting(100, Flag("training points of the fixed batch"))
    bias_repeats: int = setting(200, Flag("independent estimates R"))
    stacked: bool = setting(False, Flag("with several --seeds: train each estimator's seeds side by side in one "
                                        "process, their weights stacked (discvae.stacked; each seed's run as it "
                                        "would train alone, in its own run directory)"))

    def check(self) -> "Comparison":
        """Fail on a setting that cannot be measured."""
        sizes = ("eval_every", "iwae_k", "iwae_n", "final_k", "final_n", "bias_batch")
        if min(getattr(self, name) for name in sizes) < 1 or self.bias_repeats < 2 or self.bias_epochs < 0:
            raise InputError("eval_every, iwae_k, iwae_n, final_k, final_n and bias_batch must be positive, "
                             "bias_epochs at least 0 and bias_repeats at least 2", *sizes, "bias_epochs",
                             "bias_repeats")
        if len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"seeds must differ, got {' '.join(map(str, self.seeds))}", "seeds")
        return self


def parse_spec(text: str, num_samples: int) -> Spec:
    """``NAME[:key=value[:key=value...]]``; ``num_samples`` defaults to the comparison's budget. The name and the
    options are checked here (``make_estimator``), before any work."""
    name, *pairs = text.split(":")
    options = {"num_samples": num_samples}
    for pair in pairs:
        try:
            options.update(estimator_option(pair))
        except argparse.ArgumentTypeError:
            raise InputError(f"estimator spec {text!r}: options are key=value, separated by ':'") from None
    return Spec(text, make_estimator(name, **options))


def evals_per_point(spec: Spec, q, batch_size: int) -> float:
    """Decoder evaluations per data point and step: M times the estimator's evaluations per sample, or S / batch
    for ``exact``."""
    if spec.estimator.function is exact:
        return q.num_states / batch_size
    return spec.estimator.options["num_samples"] * spec.estimator.evaluations_per_sample


def enumerable_config(cfg: Config, bias_latent_dim: int) -> Config:
    """``cfg`` itself if its latent can be enumerated, else the same model with ``bias_latent_dim`` bits or
    classes in one group."""
    space = cfg.space
    if space.num_states is None:
        raise InputError(f"compare measures bias against enumeration: use a discrete latent, not {space}")
    if space.num_states <= EXACT_MAX_STATES:
        return cfg
    if len(space.blocks) > 1:
        raise InputError(f"latent {space} has too many states to enumerate; compare needs at most "
                         f"{EXACT_MAX_STATES}", "latent")
    return dataclasses.replace(cfg, latent=space.blocks[0].name, latent_dim=bias_latent_dim, groups=1)


def bias_variance(model, x: torch.Tensor, specs: list[Spec], repeats: int) -> list[dict]:
    """Per spec: encoder/decoder bias against the exact gradient of the loss on ``x`` with its noise floor, and the
    encoder variance (plain and times evaluations per data point)."""
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    params = encoder + decoder
    n_enc = sum(p.numel() for p in encoder)
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x, exact).loss, params)])
    q = model.posterior(x)
    rows = []
    for spec in specs:
        spec.estimator.eval()  # (one that learns is measured at its initial state, which stays as it is)
        samples = gradient_samples(lambda s=spec: model(x, s.estimator).loss, params, repeats)
        err, var = samples.mean(0) - truth, samples.var(0)
        evals = evals_per_point(spec, q, len(x))
        row = {"label": spec.label, "evals_per_point": evals}
        for part, sl in (("encoder", slice(0, n_enc)), ("decoder", slice(n_enc, None))):
            row[f"{part}_bias"] = err[sl].norm().item()
            row[f"{part}_noise_floor"] = var[sl].sum().div(repeats).sqrt().item()
            row[f"{part}_var"] = var[sl].mean().item()
        row["encoder_var_per_eval"] = row["encoder_var"] * evals
        row["truth_encoder_norm"] = truth[:n_enc].norm().item()
        rows.append(row)
    return rows


def train_with_bounds(cfgs: list[Config], data: Dataset, eval_every: int, x_evals: list[torch.Tensor], k: int,
                      progress: bool) -> list[list[dict]]:
    """Train the runs ``cfgs`` -- one, or several seeds of one estimator side by side in one process
    (``stacked.train_stacked``) -- to their ``epochs`` in chunks of ``eval_every`` epochs, measuring each run's mean
    test IWAE bound on its ``x_evals`` after each chunk; resumes partial runs and reuses the bounds already in their
    ``iwae.csv``. Returns each run's bounds."""
    outs = [Path(cfg.out) for cfg in cfgs]
    done = [[{**row, "epoch": int(row["epoch"]), "step": int(row["step"])} for row in read_csv(out / IWAE_CSV)]
            if (out / CHECKPOINT).exists() and (out / IWAE_CSV).exists() else [] for out in outs]
    for epoch in sorted({*range(eval_every, cfgs[0].epochs, eval_every), cfgs[0].epochs}):
        if all(bounds and epoch <= bounds[-1]["epoch"] for bounds in done):
            continue
        chunk, resume = [dataclasses.replace(cfg, epochs=epoch) for cfg in cfgs], (outs[0] / CHECKPOINT).exists()
        states = train_stacked(chunk, resume, progress, data) if len(chunk) > 1 else \
            [train(chunk[0], resume=resume, progress=progress, data=data)]
        for cfg, state, bounds, x_eval, out in zip(cfgs, states, done, x_evals, outs, strict=True):
            if bounds and epoch <= bounds[-1]["epoch"]:
                continue
            torch.manual_seed(cfg.seed + epoch)
            last = state.history[-1]
            bound = iwae_bound(state.model.eval(), x_eval, k).mean().item()
            bounds.append({"epoch": last["epoch"], "step": last["step"], "time": last["time"], "test_iwae": bound})
            write_csv(out / IWAE_CSV, bounds)
    return done


def run_config(base: Config, spec: Spec, out: Path) -> Config:
    """The run of ``spec`` in the comparison ``out`` (with the seed of ``base``): ``out/runs/LABEL``."""
    return dataclasses.replace(base, estimator=spec.estimator.name, estimator_options=spec.estimator.options,
                               out=str(out / "runs" / spec.label.replace("/", "_")))


def eval_points(data: Dataset, base: Config, n: int) -> torch.Tensor:
    """The first ``n`` test images, binarised once with the seed of ``base``: where the bounds are measured."""
    return fixed_binarization(data.x_test[:n], base.binarize, base.seed)


def _bias_figure(path: Path, rows: list[dict]) -> None:
    """``bias_variance.png``: bars on log axes; a zero (exact) is drawn at a tenth of the smallest non-zero value and
    labelled 0."""
    from ..figures import save_figure, subplots

    fig, axes = subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.6), dpi=110)
    y = list(range(len(rows)))
    panels = [("encoder_bias", "tab:red", "encoder gradient: ||mean error|| vs exact"),
              ("encoder_var_per_eval", "tab:blue", "encoder variance x decoder evals / point")]
    for ax, (key, color, title) in zip(axes, panels, strict=True):
        values = [r[key] for r in rows]
        low = min([v for v in values if v > 0], default=1.0) / 10
        ax.barh(y, [max(v, low) for v in values], color=color)
        for i, v in enumerate(values):
            if v <= 0:
                ax.text(low, i, " 0", va="center")
        ax.set_xscale("log")
        ax.set_yticks(y, [r["label"] for r in rows])
        ax.invert_yaxis()
        ax.set_title(title)
    axes[0].scatter([r["encoder_noise_floor"] for r in rows], y, color="k", marker="|", s=200, zorder=3,
                    label="noise floor of an unbiased estimator")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)


def _curves_figure(path: Path, curves: dict[str, dict]) -> None:
    """``curves.png``: test -ELBO, test -IWAE bound and encoder-gradient variance against steps and wall time."""
    from ..figures import save_figure, subplots

    fig, axes = subplots(2, 3, figsize=(15, 8), dpi=110)
    for label, c in curves.items():
        m, b = c["metrics"], c["bounds"]
        for row, x in enumerate(("step", "time")):
            axes[row, 0].plot([r[x] for r in m], [r["test_neg_elbo"] for r in m], marker=".", label=label)
            axes[row, 1].plot([r[x] for r in b], [-r["test_iwae"] for r in b], marker=".", label=label)
            pts = [(r[x], r["grad_encoder_var"]) for r in m if not math.isnan(r.get("grad_encoder_var", math.nan))]
            if pts:
                axes[row, 2].plot(*zip(*pts, strict=True), marker=".", label=label)
    for row, x in enumerate(("training step", "training wall time (s)")):
        for col, title in enumerate(("test -ELBO (nats)", "test -IWAE bound (nats)", "encoder gradient variance")):
            axes[row, col].set_xlabel(x)
            axes[row, col].set_title(title)
        axes[row, 2].set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == v else "-"


def _cell(row: dict, key: str, fmt=_fmt) -> str:
    """``row[key]`` formatted (``-`` if NaN), with ``± std`` when the row is a mean over seeds."""
    if row[key] != row[key]:
        return "-"
    return fmt(row[key]) + (f" ± {fmt(row[f'{key}_std'])}" if f"{key}_std" in row else "")


def _table(head: list[str], rows: list[dict], cells) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(cells(r)) + " |" for r in rows)]


def report_markdown(title: str, settings: dict, bias_rows: list[dict], final: list[dict],
                    seeds: list[int] = ()) -> str:
    """``report.md``: the settings, the bias/variance table and (if ``final``) the training table; with several
    ``seeds``, the rows are means over them (``± std``) and the figures of each seed are linked."""
    s = settings
    lines = [f"# {title}", "", "## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in s.items()]
    lines += ["", "Equal budget: every sampling estimator has the same M decoder evaluations per data point and step "
              "(arm, disarm: M/2 antithetic pairs; double-cv, rodeo and their -ls variants also take grad_z f at "
              "their M samples, one backward pass); rebar and relax evaluate f 3 times per sample and exact each "
              "latent state once per batch (the evaluations column).", ""]
    if seeds:
        lines += [f"Every number is the mean ± sample standard deviation over the {len(seeds)} seeds "
                  f"{', '.join(map(str, seeds))}; each seed's own report and figures: "
                  + ", ".join(f"[seed {seed}](seed-{seed}/report.md)" for seed in seeds) + ".", ""]
    lines += ["## Bias and variance against the exact gradient", "",
              f"Model: {s['bias_model']}, fixed batch of {s['bias_batch']} training points, "
              f"{s['bias_repeats']} independent estimates each. Bias = norm of the mean error; noise floor = "
              "sqrt(tr Cov / R), the size an unbiased estimator's mean error has from noise alone. vimco estimates "
              "the gradient of the IWAE bound, a different objective, so its 'bias' here is that difference.", ""]
    lines += _table(["estimator", "evals/point", "encoder bias", "noise floor", "decoder bias", "noise floor",
                     "encoder var", "var x evals"], bias_rows,
                    lambda r: [r["label"], _fmt(r["evals_per_point"]), *(_cell(r, key) for key in (
                        "encoder_bias", "encoder_noise_floor", "decoder_bias", "decoder_noise_floor", "encoder_var",
                        "encoder_var_per_eval"))])
    lines += ["", f"(norm of the exact encoder gradient: {_cell(bias_rows[0], 'truth_encoder_norm')})", "",
              "![bias and variance](bias_variance.png)", ""]
    if not final:
        return "\n".join(lines)
    lines += ["## Training", "",
              f"{s['epochs']} epochs each; test IWAE bound with K = {s['iwae_k']} on {s['iwae_n']} test points "
              f"every {s['eval_every']} epochs; final bound with K = {s['final_k']} on {s['final_n']} test points. "
              "Train -ELBO is the single-sample Monte Carlo ELBO of the final model on the whole training set, "
              "binarised once (the training ELBO of the RODEO / DisARM tables); test -ELBO the same on the test set "
              "after the last epoch. "
              "Time per step excludes evaluation. Encoder-gradient variance: per-coordinate variance of R "
              "estimates on a fixed training batch, at the last recorded epoch.", ""]
    lines += _table(["estimator", "epochs", "steps", "train -ELBO", "test -ELBO", "test -IWAE (final)",
                     "time/step (ms)", "train time (s)", "encoder var"], final,
                    lambda r: [r["label"], str(r["epochs"]), str(r["steps"]),
                               *(_cell(r, key, "{:.2f}".format) for key in ("train_neg_elbo", "test_neg_elbo",
                                                                             "test_neg_iwae")),
                               _cell(r, "ms_per_step", "{:.1f}".format), _cell(r, "train_time", "{:.0f}".format),
                               _cell(r, "encoder_var")])
    curves = [f"seed-{seed}/curves.png" for seed in seeds] or ["curves.png"]
    lines += ["", *(f"![training curves]({path})" for path in curves), ""]
    return "\n".join(lines)


def train_and_evaluate(base: Config, spec: Spec, settings: Comparison, out: Path, data: Dataset,
                       x_eval: torch.Tensor, x_final: torch.Tensor, progress: bool) -> tuple[dict, dict]:
    """Train ``spec`` (in ``out/runs/LABEL``) with bounds along the way; its curves and its row of the final table."""
    cfg = run_config(base, spec, out)
    bounds, = train_with_bounds([cfg], data, settings.eval_every, [x_eval], settings.iwae_k, progress)
    metrics = read_csv(Path(cfg.out) / "metrics.csv")
    model = model_for(cfg, data)
    model.load_state_dict(load_checkpoint(cfg.out)["model"])
    torch.manual_seed(base.seed)
    neg_iwae = -iwae_bound(model.eval(), x_final, settings.final_k).mean().item()
    neg_elbo_train = -iwae_bound(model, fixed_binarization(data.x_train, base.binarize, base.seed), 1).mean().item()
    variances = [r["grad_encoder_var"] for r in metrics if not math.isnan(r.get("grad_encoder_var", math.nan))]
    last = metrics[-1]
    row = {"label": spec.label, "epochs": int(last["epoch"]), "steps": int(last["step"]),
           "train_neg_elbo": neg_elbo_train, "test_neg_elbo": last["test_neg_elbo"], "test_neg_iwae": neg_iwae,
           "ms_per_step": 1e3 * last["time"] / last["step"], "train_time": last["time"],
           "encoder_var": variances[-1] if variances else math.nan}
    return {"metrics": metrics, "bounds": bounds}, row


def compare(base: Config, specs: list[Spec], settings: Comparison, data: Dataset | None = None,
            progress: bool = False) -> dict:
    """Run the comparison described in the module docstring and write its report into ``settings.out``.

    Args:
        base: the settings every run shares (its ``estimator``, options and ``out`` are each spec's own);
            ``epochs = 0`` measures bias and variance only.
        specs: the estimators, from :func:`parse_spec`.
        settings: where the report goes, what is measured, and the seeds.
        data: the dataset, if already loaded (else ``base.dataset`` is loaded).
        progress: show progress bars.

    Returns:
        What ``results.json`` holds: ``settings``, ``bias_variance`` and ``final`` (one row per spec); with several
        seeds also ``seeds``, each measured value being the mean over them beside its standard deviation
        (``KEY_std``).
    """
    if not specs:
        raise InputError("compare needs at least one estimator")
    if len({s.label for s in specs}) != len(specs):
        raise InputError("each estimator spec may appear only once")
    if base.epochs < 0:
        raise InputError("epochs must be at least 0 (0: bias and variance only)", "epochs")
    settings.check()
    if settings.stacked and len(settings.seeds) > 1 and base.epochs:
        for spec in specs:
            check_stackable(spec.estimator)
    seeds = settings.seeds or [base.seed]
    for seed in seeds:  # epochs = 0: bias and variance only
        dataclasses.replace(base, seed=seed, epochs=max(base.epochs, 1)).check()
    out = check_output(settings.out)
    data = data or load_dataset(base.dataset, base.data_dir, base.download)
    if len(seeds) == 1:
        return compare_seed(dataclasses.replace(base, seed=seeds[0]), specs, settings, out, data, progress)
    if settings.stacked and base.epochs:  # each estimator's seeds side by side; compare_seed then finds them trained
        bases = [dataclasses.replace(base, seed=seed) for seed in seeds]
        for spec in specs:
            train_with_bounds([run_config(b, spec, out / f"seed-{b.seed}") for b in bases], data,
                              settings.eval_every, [eval_points(data, b, settings.iwae_n) for b in bases],
                              settings.iwae_k, progress)
    runs = [compare_seed(dataclasses.replace(base, seed=seed), specs, settings, out / f"seed-{seed}", data, progress)
            for seed in seeds]
    settings_row = {k: v for k, v in runs[0]["settings"].items() if k != "seed"} | {"seeds": seeds}
    results = {"settings": settings_row, "seeds": seeds,
               "bias_variance": mean_std([r["bias_variance"] for r in runs], BIAS_MEASURES),
               "final": mean_std([r["final"] for r in runs], FINAL_MEASURES)}
    _bias_figure(out / "bias_variance.png", results["bias_variance"])
    write_json(out / "results.json", results)
    write_text(out / "report.md", report_markdown(_title(base, settings_row), settings_row, results["bias_variance"],
                                                  results["final"], seeds))
    return results


def mean_std(runs: list[list[dict]], measures: tuple[str, ...]) -> list[dict]:
    """The rows of several seeds' ``runs`` (one row per spec, in the same order in each) as one row per spec: each
    of ``measures`` the mean over the seeds, ``KEY_std`` its sample standard deviation; the rest as in the first."""
    rows = []
    for same_spec in zip(*runs, strict=True):
        row = dict(same_spec[0])
        for key in measures:
            values = np.array([r[key] for r in same_spec], dtype=float)
            row[key], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1))
        rows.append(row)
    return rows


def _title(base: Config, settings: dict) -> str:
    return f"Estimators compared: {base.dataset}, {settings['arch']}, {settings['latent']}"


def compare_seed(base: Config, specs: list[Spec], settings: Comparison, out: Path, data: Dataset,
                 progress: bool) -> dict:
    """The comparison with the seed of ``base``, in ``out``: bias and variance, then (``base.epochs`` > 0) the
    training runs; writes ``results.json``, ``report.md`` and the figures there and returns the results."""
    small = enumerable_config(base, settings.bias_latent_dim)
    small = dataclasses.replace(small, estimator="exact", estimator_options={}, estimator_schedule={},
                                epochs=settings.bias_epochs, grad_var_every=0, out=str(out / "bias_model"))
    if settings.bias_epochs:
        model = train(small, resume=(out / "bias_model" / CHECKPOINT).exists(), progress=progress, data=data).model
    else:
        torch.manual_seed(base.seed)
        model = model_for(small, data)
    model = model.double()
    x = fixed_binarization(data.x_train[:settings.bias_batch].double(), base.binarize, base.seed)
    torch.manual_seed(base.seed)
    bias_rows = bias_variance(model, x, specs, settings.bias_repeats)
    _bias_figure(out / "bias_variance.png", bias_rows)

    x_eval, x_final = eval_points(data, base, settings.iwae_n), eval_points(data, base, settings.final_n)
    final = []
    if base.epochs:
        curves = {}
        for spec in specs:
            curves[spec.label], row = train_and_evaluate(base, spec, settings, out, data, x_eval, x_final, progress)
            final.append(row)
        _curves_figure(out / "curves.png", curves)

    described = {"dataset": base.dataset, "arch": base.arch, "hidden": base.hidden, "slope": base.slope,
                 "init": base.init,
                 "latent": str(base.space), "prior": base.prior,
                 "binarize": base.binarize, "batch_size": base.batch_size, "lr": base.lr, "seed": base.seed,
                 "epochs": base.epochs,
                 "bias_model": f"{small.arch}, {small.space}, after {settings.bias_epochs} epoch(s) of exact",
                 "bias_batch": settings.bias_batch, "bias_repeats": settings.bias_repeats,
                 "stacked": settings.stacked, "eval_every": settings.eval_every, "iwae_k": settings.iwae_k,
                 "iwae_n": len(x_eval),
                 "final_k": settings.final_k, "final_n": len(x_final)}
    results = {"settings": described, "bias_variance": bias_rows, "final": final}
    write_json(out / "results.json", results)
    write_text(out / "report.md", report_markdown(_title(base, described), described, bias_rows, final))
    return results
