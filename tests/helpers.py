"""Tiny enumerable models and the statistics shared by the estimator tests; runs and data files for the others."""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from discvae.data import IDX_FILES
from discvae.latents import LatentSpace
from discvae.models import VAE

# |z| > Z_MAX for a mean of many i.i.d. estimates has probability < 6e-7 per coordinate under the null (normal
# approximation, R >= 1000 so the estimated standard error is accurate); with < 100 coordinates a correct
# estimator fails with probability < 1e-4.
Z_MAX = 5.0
# A scaled gradient (1 + d) g is flagged with probability >= 95 % once |d g_i| / se_i >= Z_MAX + Z_POWER on its best
# coordinate i (one-sided normal quantile 1.645).
Z_POWER = 1.645


def tiny_model(latent: str, classes: int | None = None, groups: int = 1, x_dim: int = 6, seed: int = 0,
               prior: str = "standard") -> VAE:
    """Linear encoder x -> eta and a one-hidden-layer decoder z -> logits, in float64; ``latent`` a family with
    ``classes`` (bits, classes, dimensions) and ``groups``, or a spec such as ``categorical:3+gaussian:1``."""
    torch.manual_seed(seed)
    space = LatentSpace.parse(latent, classes, groups, prior)
    encoder = nn.Linear(x_dim, space.param_dim)
    decoder = nn.Sequential(nn.Linear(space.dim, 8), nn.Tanh(), nn.Linear(8, x_dim))
    with torch.no_grad():
        for p in decoder.parameters():
            p.mul_(3.0)  # make ln p(x|z) depend strongly on z
    return VAE(encoder, decoder, space).double()


def tiny_data(n: int = 3, x_dim: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, x_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def exact_expected_ll(model, x) -> torch.Tensor:
    """sum_z q(z|x) ln p(x|z) by enumerating every z, shape [B]."""
    q = model.posterior(x)
    states = q.enumerate()[:, None, :]  # [S, 1, dim]
    return (q.log_prob(states).exp() * model.log_likelihood(x, states)).sum(0)


def exact_grad(model, x) -> torch.Tensor:
    model.zero_grad()
    exact_expected_ll(model, x).sum().backward()
    return flat_grad(model)


def estimated_grads(model, x, estimator, repeats: int, **options) -> torch.Tensor:
    """``repeats`` independent gradient estimates of sum_b E_q[ln p(x_b|z)], shape [repeats, P]."""
    from discvae.estimators import ESTIMATORS

    out = []
    for _ in range(repeats):
        model.zero_grad()
        q = model.posterior(x)
        ESTIMATORS[estimator](q, lambda z: model.log_likelihood(x, z), **options).sum().backward()
        out.append(flat_grad(model))
    return torch.stack(out)


def replica_grads(model, x, estimator, replicas: int, **options) -> torch.Tensor:
    """``replicas`` independent gradient estimates of sum_b E_q[ln p(x_b|z) - c_b], shape [replicas, P], in one
    vectorised pass (``estimator`` a registered name with ``options``, or a built estimator, e.g. a learning one in
    some state): every replica has its own copy of the parameters (``torch.func``), so one backward gives all.

    f is centred by c_b = E_q[ln p(x_b|z)] (detached): the expected gradient is unchanged (sum_z grad q(z|x) = 0 and c
    is a constant) and the variance falls. The replicas form one batch of ``replicas * B`` rows, so a batch-wide
    baseline (importance's ``mean``) also averages over other replicas, which leaves it unbiased."""
    from discvae.estimators import make_estimator

    n, c = len(x), exact_expected_ll(model, x).detach()
    params = {k: p.detach().expand(replicas, *p.shape).clone().requires_grad_() for k, p in model.named_parameters()}
    enc, dec = (_sub(params, "encoder."), _sub(params, "decoder."))
    eta = vmap(lambda p: functional_call(model.encoder, p, (x,)))(enc)
    q = model.space.posterior(eta.reshape(replicas * n, -1))

    def f(z):  # z [M, replicas * B or 1, dim] -> [M, replicas * B]
        m = z.shape[0]
        zr = z.expand(m, replicas * n, z.shape[-1]).reshape(m, replicas, n, -1)
        decode = vmap(lambda p, zz: functional_call(model.decoder, p, (zz,)), in_dims=(0, 1))
        out = model.likelihood.log_prob(x, decode(dec, zr))  # [R, M, B]
        return (out - c).transpose(0, 1).reshape(m, replicas * n)

    make_estimator(estimator, **options)(q, f).sum().backward()
    return torch.cat([p.grad.reshape(replicas, -1) for p in params.values()], 1)


def _sub(params: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): p for k, p in params.items() if k.startswith(prefix)}


def detectable_bias(samples: torch.Tensor, truth: torch.Tensor) -> float:
    """The smallest relative bias d such that estimates with mean (1 + d) ``truth`` fail the check ``|z| < Z_MAX``
    with probability >= 95 %: (Z_MAX + Z_POWER) / max_i |truth_i| / se_i, over the coordinates given."""
    se = samples.std(0) / samples.shape[0] ** 0.5
    return ((Z_MAX + Z_POWER) / (truth.abs() / se).max()).item()


def assert_unbiased_with_power(samples: torch.Tensor, truth: torch.Tensor, encoder: int, max_bias: float = 0.10,
                               seed: int = 0) -> tuple[float, float]:
    """Estimates ``samples`` [R, P] pass ``|z| < Z_MAX`` against ``truth``, and the check has power: it detects a
    relative bias of ``max_bias`` in the first ``encoder`` coordinates and in the rest (``detectable_bias``), and it
    fails realistic defects of the encoder gradient (x0.9, x1.1, noise of the same variance) while passing a correct
    but different estimator (the truth plus that noise). Returns the detectable biases (encoder, decoder)."""
    enc = slice(0, encoder)
    assert z_scores(samples, truth).abs().max() < Z_MAX, z_scores(samples, truth)
    power = detectable_bias(samples[:, enc], truth[enc]), detectable_bias(samples[:, encoder:], truth[encoder:])
    assert max(power) <= max_bias, power
    noise = torch.randn(samples[:, enc].shape, generator=torch.Generator().manual_seed(seed), dtype=samples.dtype)
    noise = noise * samples[:, enc].std(0)
    for defect, must_pass in ((0.9 * samples[:, enc], False), (1.1 * samples[:, enc], False), (noise, False),
                              (truth[enc] + noise, True)):
        passes = bool(z_scores(torch.cat([defect, samples[:, encoder:]], 1), truth).abs().max() < Z_MAX)
        assert passes == must_pass
    return power


def iwae_grad(model, x, m: int = 2) -> torch.Tensor:
    """The gradient of sum_b E over all M-tuples of states of ln (1/M) sum_m w_m, plus KL (vimco's estimand)."""
    model.zero_grad()
    exact_iwae(model, x, m).sum().backward()
    return flat_grad(model)


def exact_iwae(model, x, m: int = 2) -> torch.Tensor:
    """E over all M-tuples of states of ln (1/M) sum_m w_m, plus KL (what vimco's surrogate estimates), shape [B]."""
    q = model.posterior(x)
    states = q.enumerate()[:, None, :]
    log_q = q.log_prob(states)  # [S, B]
    log_w = model.log_likelihood(x, states) + q.prior_log_prob(states) - log_q
    total = 0.0
    for idx in torch.cartesian_prod(*[torch.arange(len(states))] * m):
        tuple_log_q = log_q[idx].sum(0)
        total = total + tuple_log_q.exp() * (torch.logsumexp(log_w[idx], 0) - math.log(m))
    return total + q.kl_to_prior()


def z_scores(samples: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(mean - truth) / standard error per coordinate; a zero-variance coordinate scores 0 if it matches to 1e-9,
    else infinity."""
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    err = mean - truth
    exact = se < 1e-12
    mismatch = torch.where(err.abs() < 1e-9, 0.0, float("inf")).to(err.dtype)
    return torch.where(exact, mismatch, err / se.clamp_min(1e-12))


def train_digits(out, *flags: str):
    """Train a one-epoch run on the embedded digits into ``out`` through the CLI (``flags`` add or override
    options); returns ``out``."""
    from discvae.cli import main

    sized = any(":" in str(flag) for flag in flags[1:] if flags[flags.index(flag) - 1] == "--latent")
    assert main(["train", "--dataset", "digits", *([] if sized else ["--latent-dim", "8"]), "--epochs", "1",
                 "--batch-size", "256", "--grad-var-every", "0", "--out", str(out), "--quiet",
                 *map(str, flags)]) == 0
    return out


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``discvae.cli.main(argv)``: (exit status, stdout, stderr)."""
    from discvae.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, match: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert match in err and "Traceback" not in err


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file's bytes."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def write_idx_folder(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """An MNIST-layout folder: ``arrays`` (``x_train``, ``y_train``, ``x_test``, ``y_test``; uint8) as its four gzip'd
    IDX files."""
    folder.mkdir(parents=True)
    for key, filename in IDX_FILES.items():
        write_gz(folder / filename, idx_bytes(arrays[key]))
    return folder


def drawn(monkeypatch, draw):
    """The figure ``draw()`` hands to ``figures.save_figure``, kept instead of written."""
    figures = []
    monkeypatch.setattr("discvae.figures.save_figure", lambda path, fig: figures.append(fig))
    draw()
    (fig,) = figures
    return fig


def framed(monkeypatch, module, draw) -> dict:
    """What ``draw()`` hands to ``module.framed_grid`` (``rows``, ``frames``, ``title``), kept instead of drawn."""
    captured = {}
    monkeypatch.setattr(module, "framed_grid",
                        lambda path, rows, frames, title: captured.update(rows=rows, frames=frames, title=title))
    draw()
    return captured

