"""Latent families q(z|x) = exp(eta^T T(z) - A(eta)) (paper eq. 4), in log space.

Every family takes the encoder's flat output ``params`` of shape ``[..., param_dim]`` and works with flat
latent vectors ``z`` of shape ``[..., dim]`` (what the decoder reads):

* :class:`Bernoulli`   -- c independent bits, z in {0,1}^c, eta = logits (eq. 19).
* :class:`Categorical` -- G independent one-hot groups of c classes, z in {e_1..e_c}^G flattened to G*c (eq. 27).
* :class:`Gaussian`    -- N(mu, diag sigma^2) from (mu, log sigma^2), the reparameterised baseline (section II).

Each has ``sample(sample_shape)`` (torch's convention: ``sample((n,))`` has shape ``[n, ..., dim]``, an int ``n``
meaning ``(n,)``; no gradient), ``log_prob(z)``, ``entropy()``, ``kl_to_prior()`` (closed form, against the uniform
prior or N(0, I)), ``prior_log_prob(z)``, ``prior_sample(sample_shape)``, ``mode()``, ``code()`` (the deterministic
code a user exports: bits, class indices or means) and, for the discrete families, ``relaxed_sample(sample_shape,
tau)`` and ``enumerate()`` of all states; the Gaussian has ``rsample(sample_shape)``. ``proposal(xi)`` builds the
same family with other natural parameters (the importance-sampling proposal q_I of eq. 20 / 28).

:func:`as_family` converts a ``torch.distributions`` posterior (``Bernoulli``, ``OneHotCategorical``, ``Normal``) to
its family here, keeping the gradient of its parameters.
"""
from __future__ import annotations

import itertools
import math
from contextlib import nullcontext

import torch
import torch.distributions as td
import torch.nn.functional as F

from .errors import InputError

MAX_ENUMERATE = 2**20


class Bernoulli:
    """Independent bits with logits ``eta``: log q(z) = eta.z - sum softplus(eta) (eq. 19, A = 1^T ln(1+e^eta))."""

    discrete = True
    has_groups = False

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    @staticmethod
    def param_dim(dim: int, groups: int = 1) -> int:
        return dim

    @property
    def dim(self) -> int:
        return self.logits.shape[-1]

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def mode(self) -> torch.Tensor:
        return (self.logits > 0).to(self.logits.dtype)

    def code(self) -> torch.Tensor:
        """The deterministic binary code: the mode [q(z_i = 1) > 1/2] as uint8 ``[..., c]``."""
        return (self.logits > 0).to(torch.uint8)

    @property
    def num_states(self) -> int:
        return 2**self.dim

    def relaxed_sample(self, sample_shape, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary concrete (Maddison et al. 2017): y = eta + L with logistic noise L = ln E1 - ln E2 (E ~ Exp(1)),
        ``soft = sigmoid(y / tau)`` (differentiable) and ``hard = [y > 0]``, an exact sample of q."""
        e = torch.empty(2, *_shape(sample_shape), *self.logits.shape, dtype=self.logits.dtype,
                        device=self.logits.device).exponential_()
        y = self.logits + (e[0].log() - e[1].log())
        return torch.sigmoid(y / tau), (y > 0).to(y.dtype)

    def proposal(self, xi: torch.Tensor) -> "Bernoulli":
        return Bernoulli(xi.expand_as(self.logits))

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            p = self.probs.expand(*_shape(sample_shape), *self.logits.shape)
            return (torch.rand_like(p) < p).to(p.dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _dot(z, self.logits) - F.softplus(self.logits).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Per-bit H = softplus(eta) - sigmoid(eta) eta, summed over bits (nats)."""
        return (F.softplus(self.logits) - self.probs * self.logits).sum(-1)

    def kl_to_prior(self) -> torch.Tensor:
        """KL(q || Bernoulli(1/2)^c) = c ln 2 - H(q)."""
        return self.dim * math.log(2.0) - self.entropy()

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full(z.shape[:-1], -self.dim * math.log(2.0), dtype=z.dtype, device=z.device)

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        bits = torch.randint(0, 2, (*_shape(sample_shape), self.dim), device=self.logits.device)
        return bits.to(self.logits.dtype)

    def enumerate(self) -> torch.Tensor:
        """All 2^c states, shape ``[2^c, c]`` (bit i of row k is bit i of k, most significant first)."""
        _check_enumerable(self.num_states)
        k = torch.arange(self.num_states, device=self.logits.device)
        shifts = torch.arange(self.dim - 1, -1, -1, device=self.logits.device)
        return ((k[:, None] >> shifts) & 1).to(self.logits.dtype)


class Categorical:
    """G independent one-hot groups of c classes; log q(z) = sum_g z_g . log_softmax(eta_g) (eq. 27)."""

    discrete = True
    has_groups = True

    def __init__(self, logits: torch.Tensor, groups: int = 1):
        if logits.shape[-1] % groups:
            raise InputError(f"categorical logits of size {logits.shape[-1]} do not split into {groups} groups")
        self.groups = groups
        self.classes = logits.shape[-1] // groups
        self.logits = logits
        self._grouped = logits.unflatten(-1, (groups, self.classes))

    @staticmethod
    def param_dim(dim: int, groups: int = 1) -> int:
        return dim * groups

    @property
    def dim(self) -> int:
        return self.groups * self.classes

    @property
    def log_probs(self) -> torch.Tensor:
        """``[..., G, c]`` normalised log-probabilities."""
        return torch.log_softmax(self._grouped, -1)

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self._grouped, -1)

    @property
    def mean(self) -> torch.Tensor:
        return self.probs.flatten(-2)

    def mode(self) -> torch.Tensor:
        return F.one_hot(self._grouped.argmax(-1), self.classes).to(self.logits.dtype).flatten(-2)

    def code(self) -> torch.Tensor:
        """The most probable class of each group, int64 ``[..., G]``."""
        return self._grouped.argmax(-1)

    @property
    def num_states(self) -> int:
        return self.classes**self.groups

    def relaxed_sample(self, sample_shape, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Concrete / Gumbel-softmax per group (Jang et al. 2017): y = eta - ln E (E ~ Exp(1)), ``soft =
        softmax(y / tau)`` computed as exp(log_softmax) and ``hard = one_hot(argmax y)``, an exact sample of q."""
        y = self._grouped - torch.empty(*_shape(sample_shape), *self._grouped.shape, dtype=self.logits.dtype,
                                        device=self.logits.device).exponential_().log()
        soft = torch.log_softmax(y / tau, -1).exp()
        return soft.flatten(-2), F.one_hot(y.argmax(-1), self.classes).to(y.dtype).flatten(-2)

    def proposal(self, xi: torch.Tensor) -> "Categorical":
        return Categorical(xi.expand_as(self.logits), self.groups)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Gumbel-max: argmax(eta - ln E), E ~ Exp(1)."""
        with torch.no_grad():
            g = self._grouped.expand(*_shape(sample_shape), *self._grouped.shape)
            e = torch.empty_like(g).exponential_()
            return F.one_hot((g - e.log()).argmax(-1), self.classes).to(g.dtype).flatten(-2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _dot(z, self.log_probs.flatten(-2))

    def entropy(self) -> torch.Tensor:
        lp = self.log_probs
        return -(lp.exp() * lp).sum((-2, -1))

    def kl_to_prior(self) -> torch.Tensor:
        """KL(q || uniform) = G ln c - H(q)."""
        return self.groups * math.log(self.classes) - self.entropy()

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return torch.full(z.shape[:-1], -self.groups * math.log(self.classes), dtype=z.dtype, device=z.device)

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        k = torch.randint(0, self.classes, (*_shape(sample_shape), self.groups), device=self.logits.device)
        return F.one_hot(k, self.classes).to(self.logits.dtype).flatten(-2)

    def enumerate(self) -> torch.Tensor:
        """All c^G states, shape ``[c^G, G*c]`` (group 0 varies slowest)."""
        _check_enumerable(self.num_states)
        eye = torch.eye(self.classes, dtype=self.logits.dtype, device=self.logits.device)
        idx = torch.tensor(list(itertools.product(range(self.classes), repeat=self.groups)),
                           device=self.logits.device)
        return eye[idx].flatten(-2)


class Gaussian:
    """Diagonal Gaussian from ``params = [mu, log sigma^2]``; the prior is N(0, I)."""

    discrete = False
    has_groups = False

    def __init__(self, params: torch.Tensor):
        self.loc, self.logvar = params.chunk(2, -1)

    @staticmethod
    def param_dim(dim: int, groups: int = 1) -> int:
        return 2 * dim

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    def mode(self) -> torch.Tensor:
        return self.loc

    def code(self) -> torch.Tensor:
        """The posterior means mu."""
        return self.loc

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (eq. 8)."""
        eps = torch.randn(*_shape(sample_shape), *self.loc.shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (0.5 * self.logvar).exp() * eps

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * ((z - self.loc) ** 2 / self.logvar.exp() + self.logvar + math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return 0.5 * (self.logvar + 1.0 + math.log(2 * math.pi)).sum(-1)

    def kl_to_prior(self) -> torch.Tensor:
        """KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum(mu^2 + sigma^2 - 1 - ln sigma^2)."""
        return 0.5 * (self.loc**2 + self.logvar.exp() - 1.0 - self.logvar).sum(-1)

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z**2 + math.log(2 * math.pi)).sum(-1)

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        return torch.randn(*_shape(sample_shape), self.dim, dtype=self.loc.dtype, device=self.loc.device)

    def enumerate(self) -> torch.Tensor:
        raise InputError("a Gaussian latent cannot be enumerated")


FAMILIES = {"bernoulli": Bernoulli, "categorical": Categorical, "gaussian": Gaussian}


def _from_one_hot(d: td.OneHotCategorical) -> Categorical:
    """Logits ``[B, c]``: one group; ``[B, G, c]`` (batch shape ``[B, G]``): G groups, flattened to ``[B, G*c]``."""
    if d.logits.dim() > 3:
        raise InputError(f"a OneHotCategorical posterior has batch shape [B] or [B, G], got {list(d.batch_shape)}")
    return Categorical(d.logits.flatten(-2), d.logits.shape[-2]) if d.logits.dim() == 3 else Categorical(d.logits)


# torch.distributions type -> its family here, with the same (differentiable) parameters; the last batch axis of
# a Bernoulli or Normal is the latent's
FROM_TORCH = {td.Bernoulli: lambda d: Bernoulli(d.logits), td.OneHotCategorical: _from_one_hot,
              td.Normal: lambda d: Gaussian(torch.cat([d.loc, 2 * d.scale.log()], -1))}


def as_family(q):
    """``q`` as one of the families above: a discvae ``Bernoulli``, ``Categorical`` or ``Gaussian`` as it is; a
    ``torch.distributions`` ``Bernoulli`` ``[B, c]`` as ``Bernoulli(logits)``, ``OneHotCategorical`` as
    ``Categorical(logits)`` (batch shape ``[B]``: one group; ``[B, G]``: G groups), ``Normal(loc, scale)``
    ``[B, c]`` as ``Gaussian([loc, 2 ln scale])``, each also wrapped in ``Independent(..., 1)``. Gradients flow to
    the torch distribution's parameters. Anything else is an ``InputError``."""
    if isinstance(q, tuple(FAMILIES.values())):
        return q
    base = q.base_dist if isinstance(q, td.Independent) and q.reinterpreted_batch_ndims == 1 else q
    for kind, convert in FROM_TORCH.items():
        if isinstance(base, kind):
            return convert(base)
    raise InputError(f"an estimator takes a discvae Bernoulli, Categorical or Gaussian, or a torch.distributions "
                     f"Bernoulli, OneHotCategorical or Normal (also in Independent(..., 1)), not "
                     f"{q if isinstance(q, td.Distribution) else type(q).__name__}")


def _shape(sample_shape) -> torch.Size:
    """torch's ``sample_shape``, an int n meaning ``(n,)``."""
    return torch.Size((sample_shape,) if isinstance(sample_shape, int) else sample_shape)


def state_count(latent: str, latent_dim: int, groups: int = 1) -> int | None:
    """The number of latent states (2^c bits, c^G categories), or None for a continuous latent."""
    if latent == "bernoulli":
        return 2**latent_dim
    if latent == "categorical":
        return latent_dim**groups
    return None


def _dot(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_i z[..., i] a[..., i]; states ``z`` of shape ``[S, 1, dim]`` shared by a batch ``a`` ``[B, dim]`` give
    ``[S, B]`` by one matmul (what ``exact`` needs) instead of an ``[S, B, dim]`` product."""
    if z.dim() == 3 and z.shape[1] == 1 and a.dim() == 2:
        with _no_autocast(a.device):  # a sum of log-space terms: fp32 under bf16 autocast too
            return z.squeeze(1) @ a.T
    return (z * a).sum(-1)


def _no_autocast(device: torch.device):
    """``torch.autocast`` turned off on ``device`` (nothing to turn off on devices without autocast, e.g. meta)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda", "mps") else nullcontext()


def _check_enumerable(n_states: int) -> None:
    if n_states > MAX_ENUMERATE:
        raise InputError(f"{n_states} latent states are too many to enumerate (limit {MAX_ENUMERATE})")
