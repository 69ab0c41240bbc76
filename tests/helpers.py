"""Tiny enumerable models and the statistics shared by the estimator tests."""
from __future__ import annotations

import torch
from torch import nn

from discvae.latents import LatentSpace
from discvae.models import VAE

# |z| > Z_MAX for a mean of many i.i.d. estimates has probability < 6e-7 per coordinate under the null (normal
# approximation, R >= 1000 so the estimated standard error is accurate); with < 100 coordinates a correct
# estimator fails with probability < 1e-4.
Z_MAX = 5.0


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
