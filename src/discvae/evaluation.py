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

from .config import check_seed
from .distributions import USED_FRACTION
from .errors import InputError
from .estimators import EXACT_MAX_STATES
from .likelihoods import binarize
from .memory import check_fits, step_bytes
from .runs import check_output, load_checkpoint, read_config, write_json
from .speed import autocast, check_precision, flush_denormals
from .training import elbo_terms, load_run, model_for

EVAL = "eval.json"
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit i is active if Var_x E_q[z_i | x] > 0.01
INFORMATIVE_BITS = 0.1  # a bit / group carries information if I(x; z_i) exceeds a tenth of a bit


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, k: int = 1000, chunk: int = 100, batch_size: int = 500,
               max_states: int = EXACT_MAX_STATES) -> torch.Tensor:
    """The K-sample importance-weighted bound on ln p(x) for every row of ``x``, shape ``[N]`` (nats).

    When the latent has at most ``max_states`` states, ln p(x, z) is tabulated once per batch for every state (one
    decoder pass over the states) and looked up for each sample instead of decoding it.
    """
    if k < 1 or chunk < 1 or batch_size < 1:
        raise ValueError("k, chunk and batch_size must be positive")
    n_states = model.space.num_states
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        q = model.posterior(xb)
        table = log_joint(model, q, xb, q.enumerate()) if n_states and n_states <= max_states else None  # [S, B]
        total = torch.full((len(xb),), -math.inf, dtype=torch.float64, device=x.device)
        for start in range(0, k, chunk):
            z = q.sample(min(chunk, k - start))
            log_pxz = (model.log_likelihood(xb, z) + q.prior_log_prob(z) if table is None
                       else table.gather(0, q.state_index(z)))
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


def fixed_binarization(x: torch.Tensor, mode: str, seed: int = 0) -> torch.Tensor:
    """The evaluation set binarised once, reproducibly (dynamic binarisation draws with its own generator)."""
    return binarize(x, mode, torch.Generator(x.device).manual_seed(seed))


def posterior_means(model, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """E_q[z|x] for every row of ``x``, float64 ``[N, dim]`` (for a categorical the class probabilities)."""
    with torch.no_grad():
        return torch.cat([model.posterior(x[i:i + batch_size]).mean for i in range(0, len(x), batch_size)]).double()


def unit_entropies(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per bit (or categorical group) i of the discrete blocks of the latent, over the data ``x``: the entropy of
    its aggregate posterior H(E_x q(z_i|x)) and its mean posterior entropy E_x H(q(z_i|x)), each ``[units]``,
    nats. Their difference is the mutual information I(x; z_i) between the data and the unit (z_i drawn from
    q(z_i|x)): how much the unit tells about x."""
    mean, q = posterior_means(model, x), model.posterior(x[:1])
    pairs = [part.unit_entropies(mean[:, s]) for (_, part), s in zip(q.parts, q.part_slices, strict=True)
             if part.discrete]
    return tuple(torch.cat(h) for h in zip(*pairs, strict=True)) if pairs else (mean.new_zeros(0),) * 2


def block_usage(part, mean: torch.Tensor) -> dict:
    """Usage of one block of the latent from its posterior means ``[N, dim]``, entropies in nats and bits (see
    :func:`latent_usage`)."""
    out = {"active_units": int((mean.var(0) > ACTIVE_THRESHOLD).sum())}
    if not part.discrete:
        return out
    marginal, conditional = part.unit_entropies(mean)
    information = marginal - conditional
    out["informative_units"] = int((information > INFORMATIVE_BITS * math.log(2)).sum())
    out.update(part.usage(mean))
    posterior_entropy = conditional.sum().item()
    for name, nats in (("posterior_entropy", posterior_entropy), ("entropy_per_dim", posterior_entropy / len(marginal)),
                       ("aggregate_entropy", marginal.sum().item()),
                       ("max_entropy", len(marginal) * math.log(part.states_per_unit)),
                       ("unit_information", information.sum().item())):
        out[f"{name}_nats"], out[f"{name}_bits"] = nats, nats / math.log(2)
    return out


def latent_usage(model, x: torch.Tensor, batch_size: int = 2000) -> dict:
    """Latent usage over the data ``x``, entropies in nats and bits; for a hybrid latent per block, each key
    prefixed by the block's name (``categorical_used_categories``, ``gaussian_active_units``, ...).

    ``active_units``: coordinates i of z with Var_x E_q[z_i|x] > 0.01 (Burda et al. 2016; for a categorical, the
    one-hot coordinates). For discrete blocks also: ``posterior_entropy`` E_x H(q(z|x)) and its mean per bit / per
    group ``entropy_per_dim``; ``aggregate_entropy`` H of the aggregate posterior q(z) = E_x q(z|x), exact for one
    categorical group, else the sum of its marginals' entropies (an upper bound); ``max_entropy`` c ln 2 or G ln c;
    ``informative_units``, the bits (groups) whose mutual information with x, I(x; z_i) = H(E_x q(z_i|x)) -
    E_x H(q(z_i|x)), exceeds ``INFORMATIVE_BITS`` (the size of latent a run needs: the paper's entropy heuristic), and
    ``unit_information``, the sum of I(x; z_i) over units. For categoricals ``used_categories``: classes whose
    aggregate mass exceeds 1 / (10 c), summed over groups.
    """
    mean = posterior_means(model, x, batch_size)
    q = model.posterior(x[:1])
    if len(q.parts) == 1:
        return block_usage(q, mean)
    out = {"active_units": int((mean.var(0) > ACTIVE_THRESHOLD).sum())}
    for (name, part), s in zip(q.parts, q.part_slices, strict=True):
        out.update({f"{name}_{k}": v for k, v in block_usage(part, mean[:, s]).items()})
    return out


def evaluate(model, x: torch.Tensor, k: int = 1000, chunk: int = 100, batch_size: int = 500,
             precision: str = "fp32") -> dict:
    """Evaluate ``model`` on the images ``x``.

    Args:
        model: a :class:`~discvae.models.VAE` (in eval mode).
        x: images ``[N, ...]``, binarised as the model was trained.
        k: importance samples of the IWAE bound.
        chunk: samples drawn at a time.
        batch_size: images at a time.
        precision: ``fp32``, or ``bf16``: the networks under autocast, the log-space sums in fp32 (InputError
            for anything else, or for bf16 where it would be slow: ``speed.check_precision``).

    Returns:
        Means over the rows of ``x``, nats per example: ``neg_elbo``, ``expected_ll``, ``kl``, ``iwae`` (the
        K-sample bound on ln p(x)), ``exact_log_px`` where the latent has at most ``EXACT_MAX_STATES`` states, the
        entries of :func:`latent_usage`, and ``seconds``.
    """
    check_precision(precision, x.device)
    start = time.perf_counter()
    with autocast(precision, x.device):
        out = elbo_terms(model, x, batch_size, precision=precision)
        out["iwae"] = iwae_bound(model, x, k, chunk, batch_size).mean().item()
        states = model.space.num_states
        if states is not None and states <= EXACT_MAX_STATES:
            out["exact_log_px"] = exact_log_likelihood(model, x).mean().item()
        out.update(latent_usage(model, x))
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def evaluate_run(run_dir, k: int = 1000, chunk: int = 100, batch_size: int = 500, train_set: bool = False,
                 seed: int = 0, precision: str = "fp32") -> dict:
    """:func:`evaluate` on the test set (and the training set) of a run; writes ``RUN_DIR/eval.json`` atomically.

    Args:
        run_dir: a run directory (``config.json`` and ``checkpoint.pt``).
        k: importance samples of the IWAE bound.
        chunk: samples drawn at a time.
        batch_size: images at a time.
        train_set: also evaluate the training set.
        seed: dynamically binarised data is binarised once with it (``fixed_binarization``); the IWAE samples are
            drawn after ``torch.manual_seed(seed)``.

    Returns:
        What ``eval.json`` holds: the run, its ``epoch`` and ``step``, ``train_seconds``, ``k``, the latent and the
        thresholds used, and ``test`` (and ``train``), each a dict of :func:`evaluate`.
    """
    if k < 1 or chunk < 1 or batch_size < 1:
        raise InputError("k, chunk and batch_size must be at least 1", "k", "chunk", "batch_size")
    check_precision(precision, torch.device("cpu"))
    check_seed(seed)
    read_config(run_dir)  # a run directory: said before anything about its output
    check_output(Path(run_dir) / EVAL, "file")  # before the work, not after it
    ckpt = load_checkpoint(run_dir)  # read once: the epoch recorded is that of the weights evaluated
    cfg, model, data = load_run(run_dir, ckpt=ckpt)
    rows = min(batch_size, len(data.x_train) if train_set else len(data.x_test))
    need = step_bytes(lambda: model_for(cfg, data), data.x_test.shape[1:], rows,
                      lambda meta, x: iwae_bound(meta, x, min(chunk, k), chunk, rows))
    check_fits(need, torch.device("cpu"), f"the bound's {min(chunk, k)} samples of {rows} images at a time",
               "lower chunk or batch_size", "chunk", "batch_size")
    result = {"run": str(run_dir), "epoch": ckpt["epoch"], "step": ckpt["step"], "train_seconds": ckpt["elapsed"],
              "k": k, "binarize": cfg.binarize, "latent": str(model.space),
              "exact_max_states": EXACT_MAX_STATES, "active_threshold": ACTIVE_THRESHOLD,
              "used_fraction": USED_FRACTION, "precision": precision}
    splits = {"test": data.x_test, **({"train": data.x_train} if train_set else {})}
    with flush_denormals():
        for name, x in splits.items():
            torch.manual_seed(seed)
            result[name] = evaluate(model, fixed_binarization(x, cfg.binarize, seed), k, chunk, batch_size, precision)
    write_json(Path(run_dir) / EVAL, result)
    return result
