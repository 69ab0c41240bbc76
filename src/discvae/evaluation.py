"""Bounds on and exact values of the test log-likelihood ln p(x), latent usage, and ``evaluate_run``.

* ``iwae_bound``: ln (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x) (Burda et al. 2016), <= ln p(x) in
  expectation, tight as K -> infinity and exact for any K when q(z|x) is the true posterior. K is processed in
  chunks so memory stays bounded; for a latent with few states ln p(x, z) is tabulated over the states.
* ``exact_log_likelihood``: ln p(x) = logsumexp_z [ln p(x|z) + ln p(z)] over every latent state, for latents small
  enough to enumerate (a categorical's c classes; c^G for G groups; 2^c bits). Each state is decoded once and
  shared by the whole batch.
* ``latent_usage``: how much of the discrete code the encoder uses (entropies in nats and bits, active units,
  used categories).
* ``evaluate_run``: all of the above for a run directory, written to ``eval.json``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .distributions import state_count
from .errors import InputError
from .estimators import EXACT_MAX_STATES
from .likelihoods import binarize
from .runs import load_checkpoint, write_json
from .training import elbo_terms, load_run

EVAL = "eval.json"
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit i is active if Var_x E_q[z_i | x] > 0.01
USED_FRACTION = 0.1  # a category is used if the aggregate posterior gives it > 1/10 of its uniform share 1/c


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, k: int = 1000, chunk: int = 100, batch_size: int = 500,
               max_states: int = EXACT_MAX_STATES) -> torch.Tensor:
    """The K-sample importance-weighted bound on ln p(x) for every row of ``x``, shape ``[N]`` (nats).

    When the latent has at most ``max_states`` states, ln p(x, z) is tabulated once per batch for every state (one
    decoder pass over the states) and looked up for each sample instead of decoding it.
    """
    if k < 1 or chunk < 1 or batch_size < 1:
        raise ValueError("k, chunk and batch_size must be positive")
    n_states = num_states(model)
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        q = model.posterior(xb)
        table = log_joint(model, q, xb, q.enumerate()) if n_states and n_states <= max_states else None  # [S, B]
        total = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, k, chunk):
            z = q.sample(min(chunk, k - start))
            log_pxz = (model.log_likelihood(xb, z) + q.prior_log_prob(z) if table is None
                       else table.gather(0, state_index(model, z)))
            total = torch.logaddexp(total, torch.logsumexp((log_pxz - q.log_prob(z)).double(), 0))
        out.append(total - math.log(k))
    return torch.cat(out)


@torch.no_grad()
def exact_log_likelihood(model, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """ln p(x) by summing p(x|z) p(z) over every latent state, shape ``[N]`` (nats)."""
    q = model.posterior(x[:1])
    states = q.enumerate()
    return torch.cat([torch.logsumexp(log_joint(model, q, x[i:i + batch_size], states).double(), 0)
                      for i in range(0, len(x), batch_size)])


def log_joint(model, q, x: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """ln p(x|z) + ln p(z) for every state ``[S, dim]`` and row of ``x``, shape ``[S, N]`` (``q`` any distribution of
    the latent family, for its prior); each state is decoded once and shared by the batch."""
    states = states[:, None, :]
    return model.log_likelihood(x, states) + q.prior_log_prob(states)


def state_index(model, z: torch.Tensor) -> torch.Tensor:
    """The row of each latent vector ``z`` ``[..., dim]`` in ``enumerate()``: its digits (bits, or each group's class)
    read as a number, most significant first."""
    if model.latent == "bernoulli":
        digits, base = z.long(), 2
    else:
        digits, base = z.unflatten(-1, (model.groups, model.latent_dim)).argmax(-1), model.latent_dim
    weights = base ** torch.arange(digits.shape[-1] - 1, -1, -1, device=z.device)
    return (digits * weights).sum(-1)


def fixed_binarization(x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """The evaluation set binarised once, reproducibly (dynamic binarisation draws with its own generator)."""
    return binarize(x, mode, torch.Generator(x.device).manual_seed(seed))


def num_states(model) -> int | None:
    """The number of latent states of ``model`` (None for a continuous latent)."""
    return state_count(model.latent, model.latent_dim, model.groups)


@torch.no_grad()
def latent_usage(model, x: torch.Tensor, batch_size: int = 2000) -> dict:
    """Latent usage over the data ``x``, entropies in nats and bits.

    ``active_units``: coordinates i of z with Var_x E_q[z_i|x] > 0.01 (Burda et al. 2016; for a categorical, the
    one-hot coordinates). For discrete latents also: ``posterior_entropy`` E_x H(q(z|x)) and its mean per bit / per
    group ``entropy_per_dim``; ``aggregate_entropy`` H of the aggregate posterior q(z) = E_x q(z|x), exact for one
    categorical group, else the sum of its marginals' entropies (an upper bound); ``max_entropy`` c ln 2 or G ln c.
    For categoricals ``used_categories``: classes whose aggregate mass exceeds 1 / (10 c), summed over groups.
    """
    mean = torch.cat([model.posterior(x[i:i + batch_size]).mean for i in range(0, len(x), batch_size)]).double()
    out = {"active_units": int((mean.var(0) > ACTIVE_THRESHOLD).sum())}
    if model.latent not in ("bernoulli", "categorical"):
        return out
    if model.latent == "bernoulli":
        per_dim = torch.special.entr(mean) + torch.special.entr(1 - mean)  # [N, c] binary entropies
        aggregate = mean.mean(0)
        agg_entropy = (torch.special.entr(aggregate) + torch.special.entr(1 - aggregate)).sum()
        max_entropy, dims = model.latent_dim * math.log(2), model.latent_dim
    else:
        probs = mean.unflatten(-1, (model.groups, model.latent_dim))  # [N, G, c]
        per_dim = torch.special.entr(probs).sum(-1)  # [N, G]
        aggregate = probs.mean(0)  # [G, c]
        agg_entropy = torch.special.entr(aggregate).sum()
        max_entropy, dims = model.groups * math.log(model.latent_dim), model.groups
        out["used_categories"] = int((aggregate > USED_FRACTION / model.latent_dim).sum())
    posterior_entropy = per_dim.sum(-1).mean().item()
    for name, nats in (("posterior_entropy", posterior_entropy), ("entropy_per_dim", posterior_entropy / dims),
                       ("aggregate_entropy", agg_entropy.item()), ("max_entropy", max_entropy)):
        out[f"{name}_nats"], out[f"{name}_bits"] = nats, nats / math.log(2)
    return out


def evaluate(model, x: torch.Tensor, k: int = 1000, chunk: int = 100, batch_size: int = 500) -> dict:
    """Negative ELBO and its terms, the K-sample IWAE bound, exact ln p(x) where the latent has at most
    ``EXACT_MAX_STATES`` states, and ``latent_usage``: means over the rows of ``x``, nats per example."""
    start = time.perf_counter()
    out = elbo_terms(model, x, batch_size)
    out["iwae"] = iwae_bound(model, x, k, chunk, batch_size).mean().item()
    states = num_states(model)
    if states is not None and states <= EXACT_MAX_STATES:
        out["exact_log_px"] = exact_log_likelihood(model, x).mean().item()
    out.update(latent_usage(model, x))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def evaluate_run(run_dir, k: int = 1000, chunk: int = 100, batch_size: int = 500, train_set: bool = False,
                 seed: int = 0) -> dict:
    """``evaluate`` on the test set (and the training set) of a run; writes ``RUN_DIR/eval.json``.

    Dynamically binarised data is binarised once with ``seed`` (``fixed_binarization``); the IWAE samples are
    drawn after ``torch.manual_seed(seed)``.
    """
    if k < 1 or chunk < 1 or batch_size < 1:
        raise InputError("--k, --chunk and --batch-size must be at least 1")
    ckpt = load_checkpoint(run_dir)  # read once: the epoch recorded is that of the weights evaluated
    cfg, model, data = load_run(run_dir, ckpt=ckpt)
    result = {"run": str(run_dir), "epoch": ckpt["epoch"], "step": ckpt["step"], "train_seconds": ckpt["elapsed"],
              "k": k, "binarize": cfg.binarize, "latent": cfg.latent, "latent_dim": cfg.latent_dim,
              "groups": cfg.groups, "exact_max_states": EXACT_MAX_STATES, "active_threshold": ACTIVE_THRESHOLD,
              "used_fraction": USED_FRACTION}
    splits = {"test": data.x_test, **({"train": data.x_train} if train_set else {})}
    for name, x in splits.items():
        torch.manual_seed(seed)
        result[name] = evaluate(model, fixed_binarization(x, cfg.binarize, seed), k, chunk, batch_size)
    write_json(Path(run_dir) / EVAL, result)
    return result
