"""The VAE and the architectures of Table I."""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .distributions import Family
from .errors import InputError
from .estimators import importance, make_estimator
from .latents import MAX_WIDTH, LatentSpace
from .likelihoods import LIKELIHOODS
from .speed import no_autocast

INITS = ("torch", "he")


class Terms(NamedTuple):
    """Batch means, in nats per example: ``loss`` carries the gradient, ``neg_elbo``, ``expected_ll`` and ``kl``
    are values, ``kl_blocks`` the KL of each block of the latent (name -> value with its gradient, for a capacity
    objective; one entry unless the latent is a hybrid), ``consistency`` (with its gradient) the consistency term
    when the batch came with a view (``VAE.forward``), else None, ``posterior`` the batch's q(z|x), from whose
    discrete blocks ``marginal_kl`` is computed when asked for, and ``view`` the view's q(z|t(x)) (None without
    one), for the contrastive terms."""

    loss: torch.Tensor
    neg_elbo: torch.Tensor
    expected_ll: torch.Tensor
    kl: torch.Tensor
    kl_blocks: dict
    consistency: torch.Tensor | None = None
    posterior: Family | None = None
    view: Family | None = None

    @property
    def discrete(self) -> Family | None:
        """The discrete blocks' q_d(y|x) of the batch, None without them (or without a posterior)."""
        return None if self.posterior is None else self.posterior.discrete_part

    @property
    def marginal_kl(self) -> torch.Tensor | None:
        """KL(q_bar || p) (with its gradient) of the batch's marginal q_bar = mean_x q_d(y|x) of the discrete blocks,
        None without discrete blocks: the part of the KL term that measures how unevenly the codes are used (Hoffman
        & Johnson 2016). Computed on each access (the training loop asks only when ``--balance`` weighs it)."""
        return None if self.discrete is None else self.discrete.aggregate().kl_to_prior()

    def contrastive(self, tau: float) -> torch.Tensor | None:
        """The InfoNCE loss (van den Oord et al. 2018; SimCLR's, Chen et al. 2020) of the discrete codes of the
        batch against those of its view, None without a view: with a_ij = ``agreement`` of q(y|x_i) and
        q(y|t(x_j)), the mean over i of -ln softmax_j(a_ij / tau)_i, both ways round: each image's code must agree
        with its own view's more than with the other images' views. ln B minus it is the InfoNCE lower bound on the
        mutual information of an image and its view, the codes' agreement the critic. Gradient through both
        sides."""
        if self.view is None:
            return None
        return symmetric_infonce(self.discrete.agreement(self.view.discrete_part) / tau)

    def gaussian_contrastive(self, tau: float) -> torch.Tensor | None:
        """The same InfoNCE loss on the continuous (Gaussian) blocks, None without a view: a_ij the cosine of the
        posterior means of x_i and t(x_j) (``Gaussian.agreement``; SimCLR's embedding and the instance-level head
        of Li et al. 2021, "Contrastive Clustering", with the Gaussian block as the features). Gradient through
        both sides."""
        if self.view is None:
            return None
        return symmetric_infonce(self.posterior.continuous_part.agreement(self.view.continuous_part) / tau)

    def cluster_contrastive(self, tau: float) -> torch.Tensor | None:
        """The cluster-level InfoNCE loss (Li et al. 2021, "Contrastive Clustering") of the batch against its view,
        None without a view: each outcome u of a discrete unit (a cluster, or a bit's 1 or 0; ``outcome_probs``)
        is the column c_u = (q(u|x_1), ..., q(u|x_B)) of the batch, and with s_uv the cosine of c_u and the view's
        c'_v, the mean over u of -ln softmax_v(s_uv / tau)_u, both ways round: each cluster must pick the same
        images in the view and different ones from the other clusters. Gradient through both sides."""
        if self.view is None:
            return None
        columns = F.normalize(self.discrete.outcome_probs(), dim=0)
        return symmetric_infonce(columns.T @ F.normalize(self.view.discrete_part.outcome_probs(), dim=0) / tau)

    def values(self, taus: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """What is logged of a batch: ``neg_elbo``, ``expected_ll``, ``kl``, for a hybrid latent ``kl_<block>`` per
        block and, with a view, ``consistency`` and each contrastive term named in ``taus`` (term -> its
        temperature: ``Config.contrastive_taus``), without gradient."""
        blocks = {f"kl_{name}": kl.detach() for name, kl in self.kl_blocks.items()} if len(self.kl_blocks) > 1 else {}
        view = {} if self.consistency is None else {"consistency": self.consistency.detach()}
        if self.view is not None:
            view.update({term: getattr(self, term)(tau).detach() for term, tau in (taus or {}).items()})
        return {"neg_elbo": self.neg_elbo, "expected_ll": self.expected_ll, "kl": self.kl, **blocks, **view}


def symmetric_infonce(logits: torch.Tensor) -> torch.Tensor:
    """The mean of -ln softmax(logits)_ii over the rows and over the columns of a square ``logits``, halved: the
    InfoNCE loss of pairs (i, i) against the other pairs of the batch, both ways round."""
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 if it has a lower precision (a network's output under bf16 autocast), else as it is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class VAE(nn.Module):
    """q(z|x) from ``encoder`` (natural parameters, eq. 4), p(x|z) from ``decoder`` and ``likelihood``.

    The negative ELBO is -E_q[ln p(x|z)] + KL(q(z|x) || p(z)) (eq. 1-2): the KL in closed form, the expectation by
    the estimator passed to each call.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent: LatentSpace | str,
                 likelihood: str = "bernoulli"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise InputError(f"unknown likelihood {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        self.encoder, self.decoder = encoder, decoder
        self.space = latent if isinstance(latent, LatentSpace) else LatentSpace.parse(latent)
        self.prior = self.space.prior_module()  # the learned prior's parameters (mixture), else None
        self.likelihood = LIKELIHOODS[likelihood]

    def posterior(self, x: torch.Tensor) -> Family:
        """q(z|x): the latent space's family (or :class:`~discvae.distributions.Joint` of blocks) built from the
        encoder's output."""
        return self.space.posterior(self._params(x), self.prior)

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        return at_least_fp32(self.encoder(x))  # fp32 log-probabilities and KL under bf16 too

    def encode(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Posterior parameters per image, in batches, without gradient and in eval mode.

        Args:
            x: images ``[N, ...]`` (on any device).
            batch_size: images per encoder call.

        Returns:
            On the CPU: q(z_i = 1|x) ``[N, c]`` for bits, q(z_g = k|x) ``[N, G, c]`` for a categorical, the means
            mu ``[N, c]`` for a Gaussian; for a hybrid those of its discrete block (``Family.encoding``).
        """
        return self._per_batch(lambda q: q.encoding(), x, batch_size)

    def codes(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Deterministic codes per image, in batches, without gradient and in eval mode.

        Args:
            x: images ``[N, ...]`` (on any device).
            batch_size: images per encoder call.

        Returns:
            On the CPU: the bits [q(z_i = 1|x) > 1/2] (the mode) as uint8 ``[N, c]``, a categorical's most probable
            class of each group as int64 ``[N, G]``, a Gaussian's means ``[N, c]``; for a hybrid the code of its
            discrete block.
        """
        return self._per_batch(lambda q: q.code(), x, batch_size)

    def _per_batch(self, fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``fn(q(z|x_b))`` for batches x_b of ``batch_size`` rows, concatenated; no gradient, in eval mode."""
        device, training = next(self.parameters()).device, self.training
        self.eval()
        try:
            with torch.no_grad():
                return torch.cat([fn(self.posterior(x[i:i + batch_size].to(device))).cpu()
                                  for i in range(0, len(x), batch_size)])
        finally:
            self.train(training)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder outputs (logits) for ``z`` of shape ``[..., dim]``, as ``[..., D]``: one call for all rows; float32
        at least (under bf16 autocast the decoder runs in bf16, the likelihood's sums over pixels in fp32)."""
        return at_least_fp32(self.decoder(z.reshape(-1, z.shape[-1]))).reshape(*z.shape[:-1], -1)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ln p(x|z) for ``x`` ``[B, ...]`` and ``z`` ``[M, B or 1, dim]``, shape ``[M, B]``."""
        return self.likelihood.log_prob(x.flatten(1), self.decode(z))

    def forward(self, x: torch.Tensor, estimator: Callable | str = importance, view: torch.Tensor | None = None,
                **options) -> Terms:
        """The terms of the negative ELBO on the batch ``x``, E_q[ln p(x|z)] estimated by ``estimator``.

        Args:
            x: a batch of images ``[B, ...]``.
            estimator: called as ``estimator(q, f, **options)`` with f(z) = ln p(x|z) (of a hybrid latent's
                discrete blocks, its continuous ones reparameterised: ``Family.estimand``): any function of the
                contract of :mod:`discvae.estimators` (e.g. an :class:`~discvae.estimators.Estimator` from
                ``make_estimator``), or a registered name, resolved and its options checked by ``make_estimator``.
            view: another view of the same images (e.g. ``augmentation.random_affine(x)``), for the consistency
                term E_x KL(q_d(x) || q_d(view)) of the discrete blocks q_d (if any), q_d(x) held fixed (no
                gradient through it): what makes the codes invariant to the change of view (IMSAT, Hu et al.
                2017), and for the contrastive terms (``Terms``).
            **options: keyword arguments for the estimator (e.g. ``num_samples=4``).

        Returns:
            ``Terms``, means over the batch: ``loss`` carries the estimated gradient (call ``loss.backward()``),
            ``neg_elbo``, ``expected_ll`` and ``kl`` are detached values, ``kl_blocks`` the KL of each block of
            the latent; with a view, ``consistency`` (not in ``loss``: the training objective weighs it).
        """
        if isinstance(estimator, str):
            estimator, options = make_estimator(estimator, **options), {}
        params = self._params(x)
        q = self.space.posterior(params, self.prior)
        expected_ll = estimator(*q.estimand(lambda z: self.log_likelihood(x, z)), **options)
        kl_blocks = {name: kl.mean() for name, kl in q.kl_parts().items()}
        blocks = list(kl_blocks.values())
        ell, kl = expected_ll.mean(), sum(blocks[1:], blocks[0])
        consistency, q_view = None, None if view is None else self.posterior(view)
        if q_view is not None and q.discrete_part is not None:
            target = self.space.posterior(params.detach(), self.prior).discrete_part
            consistency = target.kl(q_view.discrete_part).mean()
        neg_elbo = kl - ell
        return Terms(neg_elbo, neg_elbo.detach(), ell.detach(), kl.detach(), kl_blocks, consistency, q, q_view)


def _conv_plan(size: int, layers: int) -> list[int]:
    """Spatial sizes through ``layers`` 3x3 stride-2 padding-1 convolutions: s -> ceil(s / 2)."""
    sizes = [size]
    for _ in range(layers):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


class _Unflatten(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, h):
        return h.reshape(h.shape[0], *self.shape)


class Head(nn.Linear):
    """The encoder's last layer, which produces the natural parameters eta of q(z|x): an ``nn.Linear`` (same
    parameters and state dict) that runs in fp32 even under bf16 autocast. In bf16 (8 significant bits: logits of
    size 10 off by a few hundredths) FC_CVAE runs landed up to 3 nats from fp32, within 1 with this layer in fp32
    (docs/RESULTS.md)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with no_autocast(h.device):
            return super().forward(at_least_fp32(h))


def fc(input_shape, param_dim: int, latent_dim: int, hidden: int = 1024):
    """FC_BVAE / FC_CVAE of Table I: D -> 1024 ReLU -> params; dim -> 1024 ReLU -> D (logits); ``hidden`` in place
    of 1024."""
    d = math.prod(input_shape)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), Head(hidden, param_dim))
    decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d))
    return encoder, decoder


def linear(input_shape, param_dim: int, latent_dim: int):
    """The 'linear' benchmark model of the estimator literature (ARM, DisARM; 200 bits): D -> params and
    dim -> D (logits), each one affine map."""
    d = math.prod(input_shape)
    return nn.Sequential(nn.Flatten(), Head(d, param_dim)), nn.Linear(latent_dim, d)


def nonlinear(input_shape, param_dim: int, latent_dim: int, hidden: int = 200, slope: float = 0.2):
    """The 'nonlinear' benchmark model: D -> 200 -> 200 -> params and dim -> 200 -> 200 -> D, LeakyReLU with
    negative slope ``slope`` (0.2 by default, ARM's; the DisARM / RODEO code uses 0.3); ``hidden`` in place of 200."""
    d = math.prod(input_shape)

    def mlp(n_in, n_out, last=nn.Linear):
        return [nn.Linear(n_in, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, hidden), nn.LeakyReLU(slope),
                last(hidden, n_out)]

    return nn.Sequential(nn.Flatten(), *mlp(d, param_dim, Head)), nn.Sequential(*mlp(latent_dim, d))


def cnn(input_shape, param_dim: int, latent_dim: int):
    """CNN_BVAE / CNN_CVAE of Table I, for any image size.

    Encoder: Conv 3x3x32/2, 3x3x64/2, 3x3x128/2 (padding 1, ReLU), flatten, FC params; 28 -> 14 -> 7 -> 4.
    Decoder (Table I leaves the sizes open; our choice): FC dim -> 128 x s4 x s4 with s4 = ceil(s3 / 2) (2x2, 512
    units for 28x28) and ReLU, then ConvT 3x3x64/2, 3x3x64/2, 3x3x32/2 (ReLU), 3x3x1/2 (logits), padding 1 and an
    output padding of 1 or 0 chosen so each layer mirrors the encoder: 2 -> 4 -> 7 -> 14 -> 28 exactly.
    """
    if len(input_shape) != 3:
        raise InputError(f"the cnn architecture needs images [C, H, W], got data of shape {tuple(input_shape)}")
    ch = input_shape[0]
    hs, ws = _conv_plan(input_shape[1], 4), _conv_plan(input_shape[2], 4)
    encoder = nn.Sequential(
        nn.Conv2d(ch, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, 2, 1), nn.ReLU(), nn.Flatten(), Head(128 * hs[3] * ws[3], param_dim))
    widths = [128, 64, 64, 32, ch]
    layers = [nn.Linear(latent_dim, 128 * hs[4] * ws[4]), nn.ReLU(), _Unflatten((128, hs[4], ws[4]))]
    for i in range(4):
        t_h, t_w = hs[3 - i], ws[3 - i]
        pad = (t_h - 2 * hs[4 - i] + 1, t_w - 2 * ws[4 - i] + 1)
        layers.append(nn.ConvTranspose2d(widths[i], widths[i + 1], 3, 2, 1, output_padding=pad))
        if i < 3:
            layers.append(nn.ReLU())
    layers.append(nn.Flatten())
    return encoder, nn.Sequential(*layers)


def initialize(module: nn.Module, init: str) -> nn.Module:
    """Initialise the weights of ``module`` in place: ``torch`` keeps PyTorch's defaults (uniform with bound
    1/sqrt(fan_in)); ``he`` draws every Linear / Conv / ConvTranspose weight from N(0, 2 / fan_in) (He et al. 2015,
    for ReLU; fan_in as ``torch.nn.init`` computes it) and zeroes the biases."""
    if init not in INITS:
        raise InputError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    if init == "he":
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
    return module


def build_model(arch: str, input_shape, latent: str | LatentSpace = "bernoulli", latent_dim: int | None = None,
                groups: int = 1, likelihood: str = "bernoulli", init: str = "torch", hidden: int | None = None,
                slope: float | None = None) -> VAE:
    """A VAE with the Table I architecture ``arch`` for data of shape ``input_shape`` ([C, H, W] or [D]), the
    latent ``LatentSpace.parse(latent, latent_dim, groups)`` (e.g. ``"bernoulli", 50`` or
    ``"categorical:10+gaussian:10"``), its weights initialised by ``init`` (see :func:`initialize`), its hidden
    layers ``hidden`` wide and its LeakyReLU's negative slope ``slope`` if given (for the architectures whose
    builders take them: ``fc`` and ``nonlinear`` have a width, ``nonlinear`` a slope)."""
    if arch not in ARCHS:
        raise InputError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    space = latent if isinstance(latent, LatentSpace) else LatentSpace.parse(latent, latent_dim, groups)
    options = architecture_options(arch, hidden, slope)
    encoder, decoder = ARCHITECTURES[arch](tuple(input_shape), space.param_dim, space.dim, **options)
    return initialize(VAE(encoder, decoder, space, likelihood), init)


def architecture_options(arch: str, hidden: int | None = None, slope: float | None = None) -> dict:
    """The builder options of ``arch`` that are given (not None), checked: InputError for one its builder does not
    take, a width outside [1, MAX_WIDTH] or a slope outside [0, 1)."""
    options = {name: value for name, value in (("hidden", hidden), ("slope", slope)) if value is not None}
    for name, what in ARCH_OPTIONS.items():
        if name in options and name not in inspect.signature(ARCHITECTURES[arch]).parameters:
            have = [a for a, build in ARCHITECTURES.items() if name in inspect.signature(build).parameters]
            raise InputError(f"the {arch} architecture has no {what} to set ({' and '.join(have)} "
                             f"{'has' if len(have) == 1 else 'have'})", name)
    if hidden is not None and not 1 <= hidden <= MAX_WIDTH:
        raise InputError(f"hidden must be at least 1 and at most {MAX_WIDTH}, got {hidden}", "hidden")
    if slope is not None and not 0 <= slope < 1:
        raise InputError(f"slope must be at least 0 and below 1, got {slope}", "slope")
    return options


ARCHITECTURES = {"fc": fc, "cnn": cnn, "linear": linear, "nonlinear": nonlinear}  # --arch name -> its builder
# the settings that belong to an architecture (those of its builder), and what each sets
ARCH_OPTIONS = {"hidden": "hidden width", "slope": "LeakyReLU slope"}
ARCHS = tuple(ARCHITECTURES)
