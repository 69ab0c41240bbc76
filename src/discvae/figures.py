"""Image grids, convergence curves and the figures of ``discvae plot`` (matplotlib, PNGs written atomically).

Figures are made with :func:`subplots` and written with :func:`save_figure`: matplotlib ``Figure`` objects rendered
by the Agg canvas, without ``pyplot``, so that nothing global (the backend, pyplot's list of open figures) is set
by drawing or by importing this module.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .config import check_seed
from .errors import InputError
from .evaluation import INFORMATIVE_BITS, fixed_binarization, unit_entropies
from .memory import check_fits
from .runs import atomic_path, check_output, load_checkpoint, read_config
from .training import load_run

MAX_TEMPLATES = 200  # decode every discrete state when there are at most this many (the paper's c = 100, not 8 bits)
MAX_HYBRID_ROWS = 20  # rows of the figures of a hybrid latent


def image_grid(rows: list[torch.Tensor], pad: int = 1) -> np.ndarray:
    """Tile rows of images ``[n, C, H, W]`` (or vectors ``[n, D]``, see ``_as_images``) into one grey/RGB array
    in [0, 1]."""
    rows = [_as_images(r.detach().float().cpu()) for r in rows]
    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r.numpy()):
            grid[pad + i * (h + pad):pad + i * (h + pad) + h, pad + j * (w + pad):pad + j * (w + pad) + w] = \
                img.transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """``[n, C, H, W]`` as it is; vectors ``[n, D]`` (flat data) as grey H x W images with H the largest divisor
    of D not above sqrt(D): a square when D is one, a 1 x D strip when D is prime."""
    if x.dim() == 4:
        return x
    d = x.shape[-1]
    h = max(k for k in range(1, math.isqrt(d) + 1) if d % k == 0)
    return x.reshape(len(x), 1, h, d // h)


def save_grid(path, rows: list[torch.Tensor], scale: int | None = None) -> None:
    """Write ``image_grid(rows)`` as a PNG, each pixel ``scale`` x ``scale`` (default: images about 56 px high)."""
    grid = image_grid(rows).clip(0, 1)
    scale = scale or max(1, round(56 / max(_as_images(rows[0][:1]).shape[-2:])))
    grid = grid.repeat(scale, 0).repeat(scale, 1)
    with atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, grid, cmap="gray", vmin=0, vmax=1, format="png")


def check_grid(rows: int, n: int, shape) -> None:
    """Refuse, with the estimate, a figure of ``2 rows`` rows of ``n`` images of ``shape`` (as :func:`save_grid`
    draws them) whose pixels would not fit in the free memory."""
    c, h, w = _as_images(torch.empty(0, *shape, device="meta")).shape[1:]
    scale = max(1, round(56 / max(h, w)))
    need = 3 * 4 * c * (2 * rows * (h + 1) + 1) * scale * (n * (w + 1) + 1) * scale  # float32 grid, copies
    check_fits(need, torch.device("cpu"), f"a figure of {2 * rows} rows of {n} images", "lower n or rows", "n",
               "rows")


@torch.no_grad()
def reconstructions(model, x: torch.Tensor) -> torch.Tensor:
    """Decoder means for one z ~ q(z|x) per image (as the paper's Fig. 4), shaped like ``x``."""
    z = model.posterior(x).sample(1)
    return model.likelihood.mean(model.decode(z))[0].reshape(x.shape)


@torch.no_grad()
def decoded(model, z: torch.Tensor, shape) -> torch.Tensor:
    """Decoder means for latent vectors ``z`` ``[n, dim]``, as images of ``shape`` ([C, H, W] or [D])."""
    return model.likelihood.mean(model.decode(z)).reshape(len(z), *shape)


def prior_samples(model, n: int, shape) -> torch.Tensor:
    """Decoder means for ``n`` draws z ~ p(z) (uniform bits or classes, or N(0, I))."""
    return decoded(model, model.posterior(torch.zeros(1, *shape)).prior_sample(n), shape)


def templates(model, shape) -> torch.Tensor:
    """Every state of the latent's discrete blocks decoded, continuous blocks at the prior's mean 0: for a
    categorical with c classes, the c "templates" (all c^G for G groups)."""
    q = model.posterior(torch.zeros(1, *shape))
    return decoded(model, q.join(q.discrete_part.enumerate(), torch.zeros(q.continuous_dim)), shape)


@torch.no_grad()
def hybrid_grids(model, x: torch.Tensor, n: int, max_rows: int = MAX_HYBRID_ROWS) -> dict[str, list[torch.Tensor]]:
    """The two pictures of a hybrid latent (InfoGAN, JointVAE): ``classes``, a row per state of the discrete
    blocks (at most ``max_rows``) decoded with the same ``n`` draws of the continuous blocks from the prior, one per
    column; ``traversal``, a row per continuous dimension (at most ``max_rows``, those the data use most first:
    largest Var_x E_q[z_i|x]) varied from -2.5 to 2.5 over ``n`` columns, the others at 0 and the discrete code
    that of the first image of ``x``."""
    q, shape = model.posterior(x), x.shape[1:]
    states = q.discrete_part.enumerate()[:max_rows]
    z_c = torch.randn(n, q.continuous_dim, dtype=x.dtype, device=x.device)
    classes = decoded(model, q.join(states[:, None, :], z_c[None]).flatten(0, 1), shape).unflatten(0, (-1, n))
    means = torch.cat([part.mean for _, part in q.parts if not part.discrete], -1)
    dims = means.var(0).argsort(descending=True)[:max_rows]
    values = torch.linspace(-2.5, 2.5, n, dtype=x.dtype, device=x.device)
    z_t = torch.zeros(len(dims), n, q.continuous_dim, dtype=x.dtype, device=x.device)
    z_t[torch.arange(len(dims)), :, dims] = values
    traversal = decoded(model, q.join(q.discrete_part.mode()[0], z_t).flatten(0, 1), shape).unflatten(0, (-1, n))
    return {"classes": list(classes), "traversal": list(traversal)}


CURVES = (("neg_elbo", "negative ELBO (nats)", False), ("expected_ll", "E_q ln p(x|z) (nats)", False),
          ("grad_var", "gradient variance per parameter", True))
CURVE_FIGSIZE, CURVE_DPI = (12.0, 6.5), 80  # -> 960 x 520 pixels


def convergence(path, histories: dict[str, list[dict]]) -> None:
    """Paper Fig. 5: negative ELBO, expected log-likelihood (test solid, train dashed) and the gradient variance
    (encoder solid, decoder dashed, log axis), against epoch (top) and training wall time (bottom), one colour per
    run of ``histories`` (label -> rows of metrics.csv)."""
    fig, axes = subplots(2, len(CURVES), figsize=CURVE_FIGSIZE, dpi=CURVE_DPI, squeeze=False)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, (label, rows) in enumerate(histories.items()):
        color = colors[n % len(colors)]
        cols = {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in rows[0]} if rows else {}
        for row, (xkey, xlabel) in enumerate((("epoch", "epoch"), ("time", "training wall time (s)"))):
            if not cols:
                continue
            for col, (key, ylabel, log) in enumerate(CURVES):
                ax = axes[row, col]
                pairs = (("grad_encoder_var", "encoder"), ("grad_decoder_var", "decoder")) if key == "grad_var" \
                    else ((f"test_{key}", "test"), (f"train_{key}", "train"))
                for style, (column, part) in zip(("-", "--"), pairs, strict=True):
                    y = cols.get(column)
                    if y is None:
                        continue
                    ok = np.isfinite(y)
                    ax.plot(cols[xkey][ok], y[ok], style, color=color, lw=1.2,
                            label=f"{label} ({part})" if row == 0 else None)
                ax.set(xlabel=xlabel, ylabel=ylabel)
                if log:
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
    for ax in axes[0]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(path, fig)


def unit_information(path, model, x: torch.Tensor) -> None:
    """The paper's entropy heuristic for the latent size: per bit (or categorical group), sorted, the mutual
    information I(x; z_i) = H(E_x q(z_i|x)) - E_x H(q(z_i|x)) over the data ``x`` and the aggregate entropy
    H(E_x q(z_i|x)), in bits, with the ``INFORMATIVE_BITS`` line; the units above it are the ones the code needs."""
    marginal, conditional = (h.numpy() / np.log(2) for h in unit_entropies(model, x))
    information = marginal - conditional
    order = np.argsort(-information)
    fig, ax = subplots(figsize=(8, 3.2), dpi=80)
    units = np.arange(1, len(order) + 1)
    ax.bar(units, marginal[order], color="0.8", label="H(E_x q(z_i|x))")
    ax.bar(units, information[order], color="tab:blue", label="I(x; z_i)")
    ax.axhline(INFORMATIVE_BITS, color="tab:red", lw=1, label=f"{INFORMATIVE_BITS} bit")
    informative = int((information > INFORMATIVE_BITS).sum())
    ax.set(xlabel="unit, sorted by I(x; z_i)", ylabel="bits",
           title=f"{informative} of {len(order)} units carry more than {INFORMATIVE_BITS} bit about x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(path, fig)


def subplots(*grid, figsize=None, dpi=None, **kwargs):
    """A new figure and its axes, as ``matplotlib.pyplot.subplots(*grid, figsize=..., dpi=..., **kwargs)`` makes
    them, but held by no backend: draw on them and write them with :func:`save_figure`."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*grid, **kwargs)


def save_figure(path, fig) -> None:
    """Render ``fig`` at its dpi with the Agg canvas and write it to ``path`` atomically as a PNG with a 64-colour
    palette (a few times smaller than matplotlib's RGBA PNG, and plots have few colours)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3]
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).quantize(64).save(tmp, format="png", optimize=True)


def plot_runs(run_dirs: list, out=None, n: int = 16, rows: int = 2, seed: int = 0) -> list[Path]:
    """Write the figures of ``run_dirs`` into ``out`` (default the first run directory); returns their paths.

    ``convergence.png`` overlays every run (Fig. 5), from the history in each checkpoint (what ``metrics.csv``
    holds). Per run ``NAME-reconstructions.png`` (``rows`` pairs of rows:
    ``n`` fixed test images above their reconstructions from one z ~ q(z|x), Fig. 4, 6, 7), ``NAME-samples.png``
    (``rows`` x ``n`` images decoded from z ~ p(z)), for a latent with discrete blocks ``NAME-units.png``
    (:func:`unit_information`) and, when those have at most ``MAX_TEMPLATES`` states, ``NAME-templates.png``
    (every state decoded, ``n`` per row) or, for a hybrid latent, ``NAME-classes.png`` and ``NAME-traversal.png``
    (:func:`hybrid_grids`). With several runs on data of one shape
    also ``reconstructions.png``: the test images above each run's reconstructions, in the order given.
    """
    if n < 1 or rows < 1:
        raise InputError("n and rows must be at least 1", "n", "rows")
    names = [Path(r).resolve().name for r in run_dirs]
    if len(set(names)) < len(names):
        raise InputError(f"run directories need distinct names to label them: {', '.join(names)}")
    check_seed(seed)
    for run in run_dirs:
        read_config(run)  # run directories: said before anything about the output
    out = check_output(out or run_dirs[0])
    checkpoints = [load_checkpoint(run) for run in run_dirs]
    loaded = [load_run(run, ckpt=ckpt) for run, ckpt in zip(run_dirs, checkpoints, strict=True)]
    written, recons = [], {}
    histories = {name: ckpt["history"] for name, ckpt in zip(names, checkpoints, strict=True)}
    for name, (cfg, model, data) in zip(names, loaded, strict=True):
        check_grid(rows, n, data.x_test.shape[1:])
        torch.manual_seed(seed)
        x = fixed_binarization(data.x_test[: n * rows], cfg.binarize, seed)
        shape = x.shape[1:]
        x_hat = reconstructions(model, x)
        recons[name] = (x, x_hat)
        grids = {"reconstructions": [t for i in range(rows) for t in (x[i * n:(i + 1) * n], x_hat[i * n:(i + 1) * n])],
                 "samples": list(prior_samples(model, n * rows, shape).split(n))}
        q = model.posterior(x[:1])
        if q.discrete_part is not None and q.discrete_part.num_states <= MAX_TEMPLATES:
            grids.update(hybrid_grids(model, x, n) if q.continuous_dim else
                         {"templates": list(templates(model, shape).split(n))})
        for kind, grid in grids.items():
            written.append(out / f"{name}-{kind}.png")
            save_grid(written[-1], grid)
        if q.discrete_part is not None:
            written.append(out / f"{name}-units.png")
            unit_information(written[-1], model, fixed_binarization(data.x_test, cfg.binarize, seed))
    written.insert(0, out / "convergence.png")
    convergence(written[0], histories)
    pairs = list(recons.values())
    if len(pairs) > 1 and all(torch.equal(p[0], pairs[0][0]) for p in pairs):
        written.append(out / "reconstructions.png")
        save_grid(written[-1], [t for i in range(rows) for t in
                                (pairs[0][0][i * n:(i + 1) * n], *(p[1][i * n:(i + 1) * n] for p in pairs))])
    return written
