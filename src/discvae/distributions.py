"""Latent families q(z|x) = exp(eta^T T(z) - A(eta)) (paper eq. 4), in log space.

Every family takes the encoder's flat output ``params`` of shape ``[..., param_dim]`` and works with flat
latent vectors ``z`` of shape ``[..., dim]`` (what the decoder reads):

* :class:`Bernoulli`   -- c independent bits, z in {0,1}^c, eta = logits (eq. 19).
* :class:`Categorical` -- G independent one-hot groups of c classes, z in {e_1..e_c}^G flattened to G*c (eq. 27).
* :class:`Gaussian`    -- N(mu, diag sigma^2) from (mu, log sigma^2), the reparameterised baseline (section II).
* :class:`Joint`       -- independent blocks of the above, z their concatenation (hybrid latents such as
  ``categorical:10+gaussian:10``).
* :class:`Mixture`     -- a categorical y and a Gaussian z with the prior (1/c) N(z; mu_y, diag sigma_y^2), the
  decoder reading z (the ``mixture`` prior, sigma_y = 1, and ``mixture-var``: clustering, GMVAE / VaDE).

Every family is a :class:`Family` and answers what callers need (they never branch on a family's name).

Each has ``sample(sample_shape)`` (torch's convention: ``sample((n,))`` has shape ``[n, ..., dim]``, an int ``n``
meaning ``(n,)``; no gradient), ``log_prob(z)``, ``entropy()``, ``kl_to_prior()`` (closed form, against the uniform
prior or N(0, I)), ``prior_log_prob(z)``, ``prior_sample(sample_shape)``, ``mode()``, ``code()`` (the deterministic
code a user exports: bits, class indices or means) and, for the discrete families, ``relaxed_sample(sample_shape,
tau)``, ``enumerate()`` of all states, and ``agreement(other)`` and ``outcome_probs()``, what the contrastive terms
compare; the Gaussian has ``rsample(sample_shape)``. ``proposal(xi)`` builds the
same family with other natural parameters (the importance-sampling proposal q_I of eq. 20 / 28).

:func:`as_family` converts a ``torch.distributions`` posterior (``Bernoulli``, ``OneHotCategorical``, ``Normal``) to
its family here, keeping the gradient of its parameters. The shape of a latent -- which families, what
sizes -- is :class:`discvae.latents.LatentSpace`.
"""
from __future__ import annotations

import functools
import itertools
import math
from contextlib import nullcontext
from contextvars import ContextVar
from typing import Callable

import torch
import torch.distributions as td
import torch.nn.functional as F

from .errors import InputError
from .speed import no_autocast

MAX_ENUMERATE = 2**20
# the context every random draw of a latent runs in (``sampling()``): stacked.RunStreams while stacked runs step
SAMPLING: ContextVar = ContextVar("discvae_sampling", default=None)
USED_FRACTION = 0.1  # a category is used if the aggregate posterior gives it > 1/10 of its uniform share 1/c


class Family:
    """The contract of a latent family q(z|x), batch shape ``[B]`` and flat states ``z`` ``[..., dim]``.

    Every family has ``dim``, ``discrete``, ``sample(sample_shape)`` (no gradient), ``log_prob(z)``, ``entropy()``,
    ``kl_to_prior()``, ``prior_log_prob(z)``, ``prior_sample(sample_shape)``, ``mean``, ``mode()`` and ``code()``
    (the deterministic code). Discrete families also have ``probs``, ``logits``, ``num_states``, ``enumerate()``
    and ``state_index(z)`` (a state's row in ``enumerate()``), ``kl(other)`` (to another q of the same shape),
    ``aggregate()`` (the batch's marginal of each unit), ``relaxed_sample(sample_shape, tau)``, ``proposal(xi)``
    and, from posterior means ``[N, dim]`` over a data set, ``unit_entropies(mean)`` and ``usage(mean)``; continuous
    ones ``rsample(sample_shape)``. Defined here for every family: its blocks (``parts``) and what an estimator sees
    (``estimand``)."""

    name: str
    discrete: bool
    binary = False  # are the states bit vectors (a code np.packbits can pack)?
    num_states: int | None = None  # a discrete family's count of states
    min_size = 1  # the smallest block: 1 bit or dimension, 2 classes
    grouped = False  # may a block have several independent groups (``categorical:10x3``)?

    @classmethod
    def from_params(cls, params: torch.Tensor, groups: int = 1, prior_logits: torch.Tensor | None = None) -> "Family":
        """The family from the encoder's output; ``prior_logits``: a discrete family's learned prior (None: its
        standard one)."""
        if prior_logits is not None:
            raise ValueError(f"a {cls.name} block has no learned prior")
        return cls(params)

    @staticmethod
    def dim_of(size: int, groups: int = 1) -> int:
        """The length of z for a block of ``size`` (bits, classes per group, dimensions)."""
        return size

    @staticmethod
    def states_of(size: int, groups: int = 1) -> int | None:
        """The number of states of such a block; None for a continuous one."""
        return None

    @property
    def parts(self) -> list[tuple[str, "Family"]]:
        """The independent blocks of q, named, in the order of z: here the family alone."""
        return [(self.name, self)]

    @property
    def part_slices(self) -> list[slice]:
        """Where each block of ``parts`` lies in z."""
        return [slice(0, self.dim)]

    def kl_parts(self) -> dict[str, torch.Tensor]:
        """KL(q || p) of each block, by name, ``[B]`` each: here the family's ``kl_to_prior()``."""
        return {self.name: self.kl_to_prior()}

    def estimand(self, f: Callable) -> tuple["Family", Callable]:
        """What a gradient estimator of E_q[f(z)] is given: ``(q, f)`` itself (a :class:`Joint` hands over its
        discrete part with its continuous blocks reparameterised)."""
        return self, f

    @property
    def discrete_part(self) -> "Family | None":
        """The discrete blocks of q (q itself for a discrete family), None if there are none."""
        return self if self.discrete else None

    @property
    def continuous_part(self) -> "Family | None":
        """The continuous blocks of q (q itself for a continuous family), None if there are none."""
        return None if self.discrete else self

    @property
    def continuous_dim(self) -> int:
        """The length of the continuous blocks' part of z."""
        return 0 if self.discrete else self.dim

    def join(self, z_d: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        """z from the states ``z_d`` ``[..., dim_d]`` of the discrete blocks and ``z_c`` ``[..., dim_c]`` of the
        continuous ones, broadcast against each other."""
        return z_d if self.discrete else z_c

    def encoding(self) -> torch.Tensor:
        """What ``VAE.encode`` returns: a discrete family's ``probs``, a continuous one's ``mean``."""
        return self.probs if self.discrete else self.mean

    def usage(self, mean: torch.Tensor) -> dict:
        """Family-specific usage statistics from the posterior means ``[N, dim]`` (see ``latent_usage``)."""
        return {}


class Bernoulli(Family):
    """Independent bits with logits ``eta``: log q(z) = eta.z - sum softplus(eta) (eq. 19, A = 1^T ln(1+e^eta)).
    The prior p(z) is uniform, or Bernoulli(sigmoid(lambda)) with learned logits ``prior_logits`` lambda ``[c]``."""

    name = "bernoulli"
    discrete = True
    binary = True

    def __init__(self, logits: torch.Tensor, prior_logits: torch.Tensor | None = None):
        self.logits = logits
        self.prior_logits = prior_logits

    @classmethod
    def from_params(cls, params: torch.Tensor, groups: int = 1,
                    prior_logits: torch.Tensor | None = None) -> "Bernoulli":
        return cls(params, prior_logits)

    @staticmethod
    def param_dim(size: int, groups: int = 1) -> int:
        return size

    @staticmethod
    def states_of(size: int, groups: int = 1) -> int:
        return 2**size

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

    def agreement(self, other: "Bernoulli") -> torch.Tensor:
        """``[B, B']``: the expected share of the c bits in which z ~ q_i and z' ~ q'_j agree, for every row i of
        this batch and j of ``other``'s (1 - their expected Hamming distance / c): (p p'^T + (1 - p)(1 - p')^T) / c,
        p = q(z = 1). A discrete family's ``agreement`` is what ``Terms.contrastive`` compares codes by."""
        p, r = self.probs, other.probs
        return (p @ r.T + (1 - p) @ (1 - r).T) / self.dim

    def outcome_probs(self) -> torch.Tensor:
        """``[..., 2c]``: q(z_i = 1) for each bit, then q(z_i = 0): each bit as a two-way categorical. Its columns
        over a batch are what ``Terms.cluster_contrastive`` compares."""
        p = self.probs
        return torch.cat([p, 1 - p], -1)

    @property
    def num_states(self) -> int:
        return 2**self.dim

    def relaxed_sample(self, sample_shape, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary concrete (Maddison et al. 2017): y = eta + L with logistic noise L = ln E1 - ln E2 (E ~ Exp(1)),
        ``soft = sigmoid(y / tau)`` (differentiable) and ``hard = [y > 0]``, an exact sample of q."""
        with sampling():
            e = torch.empty(2, *_shape(sample_shape), *self.logits.shape, dtype=self.logits.dtype,
                            device=self.logits.device).exponential_()
        y = self.logits + (e[0].log() - e[1].log())
        return torch.sigmoid(y / tau), (y > 0).to(y.dtype)

    def proposal(self, xi: torch.Tensor) -> "Bernoulli":
        return Bernoulli(xi.expand_as(self.logits), self.prior_logits)

    def sample(self, sample_shape=()) -> torch.Tensor:
        with torch.no_grad():
            p = self.probs.expand(*_shape(sample_shape), *self.logits.shape)
            with sampling():
                u = torch.rand_like(p)
            return (u < p).to(p.dtype)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _dot(z, self.logits) - F.softplus(self.logits).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Per-bit H = softplus(eta) - sigmoid(eta) eta, summed over bits (nats)."""
        return (F.softplus(self.logits) - self.probs * self.logits).sum(-1)

    def kl(self, other: "Bernoulli") -> torch.Tensor:
        """KL(q || other) for bits of the same shape: sum_i p_i (ln p_i - ln p'_i) + (1 - p_i) (ln(1 - p_i) -
        ln(1 - p'_i)) with p = sigmoid(a), p' = sigmoid(b); as ln p = a - softplus(a) and ln(1 - p) = -softplus(a),
        the sum of p_i (a_i - b_i) + softplus(b_i) - softplus(a_i) (half the kernels of the four log-sigmoids)."""
        a, b = self.logits, other.logits
        return (self.probs * (a - b) + F.softplus(b) - F.softplus(a)).sum(-1)

    def aggregate(self) -> "Bernoulli":
        """The batch's marginal of each bit, p_i = mean_b q(z_i = 1|x_b), as one Bernoulli (batch shape ``[]``):
        logits ln p_i - ln(1 - p_i) from log-sum-exps of the log-sigmoids."""
        return Bernoulli(torch.logsumexp(F.logsigmoid(self.logits), 0) - torch.logsumexp(F.logsigmoid(-self.logits), 0),
                         self.prior_logits)

    def _prior(self) -> "Bernoulli":
        """The learned prior Bernoulli(sigmoid(lambda)), batch shape ``[]``."""
        return Bernoulli(self.prior_logits)

    def kl_to_prior(self) -> torch.Tensor:
        """KL(q || Bernoulli(1/2)^c) = c ln 2 - H(q); with a learned prior, ``kl`` to Bernoulli(lambda)."""
        if self.prior_logits is None:
            return self.dim * math.log(2.0) - self.entropy()
        return self.kl(self._prior())

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """ln p(z): -c ln 2, or the learned prior's ``log_prob``."""
        if self.prior_logits is None:
            return torch.full(z.shape[:-1], -self.dim * math.log(2.0), dtype=z.dtype, device=z.device)
        return self._prior().log_prob(z)

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        if self.prior_logits is None:
            bits = torch.randint(0, 2, (*_shape(sample_shape), self.dim), device=self.logits.device)
            return bits.to(self.logits.dtype)
        return Bernoulli(self.prior_logits.detach().to(self.logits.dtype)).sample(sample_shape)

    def enumerate(self) -> torch.Tensor:
        """All 2^c states, shape ``[2^c, c]`` (bit i of row k is bit i of k, most significant first)."""
        _check_enumerable(self.num_states)
        k = torch.arange(self.num_states, device=self.logits.device)
        shifts = torch.arange(self.dim - 1, -1, -1, device=self.logits.device)
        return ((k[:, None] >> shifts) & 1).to(self.logits.dtype)

    def state_index(self, z: torch.Tensor) -> torch.Tensor:
        """The row of each state ``z`` ``[..., c]`` in ``enumerate()``: its bits read as a binary number."""
        return _digits_to_index(z.long(), 2)

    @staticmethod
    def unit_entropies(mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bit, from the posterior means ``[N, c]``: H(E_x q(z_i|x)) and E_x H(q(z_i|x)), nats ``[c]``; their
        difference is the mutual information I(x; z_i)."""
        aggregate = mean.mean(0)
        return (torch.special.entr(aggregate) + torch.special.entr(1 - aggregate),
                (torch.special.entr(mean) + torch.special.entr(1 - mean)).mean(0))

    states_per_unit = 2


class Categorical(Family):
    """G independent one-hot groups of c classes; log q(z) = sum_g z_g . log_softmax(eta_g) (eq. 27). The prior
    p(z) is uniform, or softmax(lambda_g) per group with learned logits ``prior_logits`` lambda ``[G*c]``."""

    name = "categorical"
    min_size, grouped = 2, True
    discrete = True

    def __init__(self, logits: torch.Tensor, groups: int = 1, prior_logits: torch.Tensor | None = None):
        if logits.shape[-1] % groups:
            raise InputError(f"categorical logits of size {logits.shape[-1]} do not split into {groups} groups")
        self.groups = groups
        self.classes = logits.shape[-1] // groups
        self.logits = logits
        self.prior_logits = prior_logits
        self._grouped = logits.unflatten(-1, (groups, self.classes))

    @classmethod
    def from_params(cls, params: torch.Tensor, groups: int = 1,
                    prior_logits: torch.Tensor | None = None) -> "Categorical":
        return cls(params, groups, prior_logits)

    @staticmethod
    def param_dim(size: int, groups: int = 1) -> int:
        return size * groups

    @staticmethod
    def dim_of(size: int, groups: int = 1) -> int:
        return size * groups

    @staticmethod
    def states_of(size: int, groups: int = 1) -> int:
        return size**groups

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

    def agreement(self, other: "Categorical") -> torch.Tensor:
        """``[B, B']``: the expected share of the G groups in which z ~ q_i and z' ~ q'_j pick the same class,
        sum_g q_g . q'_g / G."""
        return self.mean @ other.mean.T / self.groups

    def outcome_probs(self) -> torch.Tensor:
        """``[..., G c]``: q(z_g = k) for each group g and class k (the ``mean``)."""
        return self.mean

    @property
    def num_states(self) -> int:
        return self.classes**self.groups

    def relaxed_sample(self, sample_shape, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Concrete / Gumbel-softmax per group (Jang et al. 2017): y = eta - ln E (E ~ Exp(1)), ``soft =
        softmax(y / tau)`` computed as exp(log_softmax) and ``hard = one_hot(argmax y)``, an exact sample of q."""
        with sampling():
            e = torch.empty(*_shape(sample_shape), *self._grouped.shape, dtype=self.logits.dtype,
                            device=self.logits.device).exponential_()
        y = self._grouped - e.log()
        soft = torch.log_softmax(y / tau, -1).exp()
        return soft.flatten(-2), F.one_hot(y.argmax(-1), self.classes).to(y.dtype).flatten(-2)

    def proposal(self, xi: torch.Tensor) -> "Categorical":
        return Categorical(xi.expand_as(self.logits), self.groups, self.prior_logits)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Gumbel-max: argmax(eta - ln E), E ~ Exp(1)."""
        with torch.no_grad():
            g = self._grouped.expand(*_shape(sample_shape), *self._grouped.shape)
            with sampling():
                e = torch.empty_like(g).exponential_()
            return F.one_hot((g - e.log()).argmax(-1), self.classes).to(g.dtype).flatten(-2)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return _dot(z, self.log_probs.flatten(-2))

    def entropy(self) -> torch.Tensor:
        lp = self.log_probs
        return -(lp.exp() * lp).sum((-2, -1))

    def kl(self, other: "Categorical") -> torch.Tensor:
        """KL(q || other) for groups of the same shape: sum_g sum_k q_gk (ln q_gk - ln q'_gk)."""
        lp = self.log_probs
        return (lp.exp() * (lp - other.log_probs)).sum((-2, -1))

    def aggregate(self) -> "Categorical":
        """The batch's marginal of each group, mean_b q(z_g|x_b), as one Categorical (batch shape ``[]``): logits
        logsumexp_b ln q(z_g|x_b)."""
        return Categorical(torch.logsumexp(self.log_probs, 0).flatten(-2), self.groups, self.prior_logits)

    def _prior(self) -> "Categorical":
        """The learned prior softmax(lambda_g) as a Categorical of batch shape ``[]``."""
        return Categorical(self.prior_logits, self.groups)

    def kl_to_prior(self) -> torch.Tensor:
        """KL(q || uniform) = G ln c - H(q); with a learned prior, ``kl`` to softmax(lambda)."""
        if self.prior_logits is None:
            return self.groups * math.log(self.classes) - self.entropy()
        return self.kl(self._prior())

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """ln p(z): -G ln c, or the learned prior's ``log_prob``."""
        if self.prior_logits is None:
            return torch.full(z.shape[:-1], -self.groups * math.log(self.classes), dtype=z.dtype, device=z.device)
        return self._prior().log_prob(z)

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        if self.prior_logits is None:
            k = torch.randint(0, self.classes, (*_shape(sample_shape), self.groups), device=self.logits.device)
            return F.one_hot(k, self.classes).to(self.logits.dtype).flatten(-2)
        return Categorical(self.prior_logits.detach().to(self.logits.dtype), self.groups).sample(sample_shape)

    def enumerate(self) -> torch.Tensor:
        """All c^G states, shape ``[c^G, G*c]`` (group 0 varies slowest)."""
        _check_enumerable(self.num_states)
        eye = torch.eye(self.classes, dtype=self.logits.dtype, device=self.logits.device)
        idx = torch.tensor(list(itertools.product(range(self.classes), repeat=self.groups)),
                           device=self.logits.device)
        return eye[idx].flatten(-2)

    def state_index(self, z: torch.Tensor) -> torch.Tensor:
        """The row of each state ``z`` ``[..., G*c]`` in ``enumerate()``: its classes read as a base-c number."""
        return _digits_to_index(z.unflatten(-1, (self.groups, self.classes)).argmax(-1), self.classes)

    def unit_entropies(self, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group, from the posterior means ``[N, G*c]``: H(E_x q(z_g|x)) and E_x H(q(z_g|x)), nats ``[G]``."""
        probs = mean.unflatten(-1, (self.groups, self.classes))
        return torch.special.entr(probs.mean(0)).sum(-1), torch.special.entr(probs).sum(-1).mean(0)

    def usage(self, mean: torch.Tensor) -> dict:
        """``used_categories``: classes whose aggregate posterior mass E_x q(z_g = k|x) exceeds ``USED_FRACTION``
        of its uniform share 1/c, summed over groups."""
        aggregate = mean.unflatten(-1, (self.groups, self.classes)).mean(0)
        return {"used_categories": int((aggregate > USED_FRACTION / self.classes).sum())}

    @property
    def states_per_unit(self) -> int:
        return self.classes


class Gaussian(Family):
    """Diagonal Gaussian from ``params = [mu, log sigma^2]``; the prior is N(0, I)."""

    name = "gaussian"
    discrete = False

    def __init__(self, params: torch.Tensor):
        self.loc, self.logvar = params.chunk(2, -1)

    @classmethod
    def of(cls, loc: torch.Tensor, logvar: torch.Tensor) -> "Gaussian":
        """N(loc, diag exp(logvar)), the two broadcast against each other."""
        return cls(torch.cat(torch.broadcast_tensors(loc, logvar), -1))

    @staticmethod
    def param_dim(size: int, groups: int = 1) -> int:
        return 2 * size

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

    def agreement(self, other: "Gaussian") -> torch.Tensor:
        """``[B, B']``: the cosine of the posterior means mu_i and mu'_j, for every row i of this batch and j of
        ``other``'s (SimCLR's similarity of two embeddings), what ``Terms.gaussian_contrastive`` compares by."""
        return F.normalize(self.loc, dim=-1) @ F.normalize(other.loc, dim=-1).T

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (eq. 8)."""
        with sampling():
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


class Joint(Family):
    """Independent blocks q(z) = prod_b q_b(z_b), z the concatenation of the blocks' states in order (a hybrid
    latent, e.g. a categorical beside a Gaussian). ln q, entropy, KL and the prior are sums over the blocks."""

    def __init__(self, parts: list[tuple[str, Family]]):
        self._parts = list(parts)
        self.discrete = all(part.discrete for _, part in self._parts)
        ends = list(itertools.accumulate(part.dim for _, part in self._parts))
        self.slices = [slice(end - part.dim, end) for end, (_, part) in zip(ends, self._parts, strict=True)]
        self.name = "+".join(name for name, _ in self._parts)

    @property
    def parts(self) -> list[tuple[str, Family]]:
        return list(self._parts)

    @property
    def part_slices(self) -> list[slice]:
        return list(self.slices)

    @property
    def dim(self) -> int:
        return self.slices[-1].stop

    def _each(self, method: str, *args) -> list:
        return [getattr(part, method)(*args) for _, part in self._parts]

    def _split(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z[..., s] for s in self.slices]

    def _sum(self, values: list[torch.Tensor]) -> torch.Tensor:
        return functools.reduce(torch.add, values)

    def aggregate(self) -> "Joint":
        """Each block's ``aggregate()``."""
        return Joint([(name, part.aggregate()) for name, part in self._parts])

    def agreement(self, other: "Joint") -> torch.Tensor:
        """The mean of the (discrete) blocks' ``agreement``."""
        return self._sum([part.agreement(theirs) for (_, part), (_, theirs)
                          in zip(self._parts, other._parts, strict=True)]) / len(self._parts)

    def outcome_probs(self) -> torch.Tensor:
        """The (discrete) blocks' ``outcome_probs`` side by side."""
        return torch.cat(self._each("outcome_probs"), -1)

    def kl(self, other: "Joint") -> torch.Tensor:
        """KL(q || other) for the same blocks: the sum of the blocks' KLs."""
        return self._sum([part.kl(theirs) for (_, part), (_, theirs) in zip(self._parts, other._parts, strict=True)])

    @property
    def discrete_part(self) -> Family | None:
        return self._part_where(True)

    @property
    def continuous_part(self) -> Family | None:
        return self._part_where(False)

    def _part_where(self, discrete: bool) -> Family | None:
        """The blocks whose ``discrete`` is ``discrete``: None, q itself when they are all its blocks, the one
        block, or their :class:`Joint`."""
        chosen = [(name, part) for name, part in self._parts if part.discrete == discrete]
        if len(chosen) == len(self._parts) or not chosen:
            return self if chosen else None
        return chosen[0][1] if len(chosen) == 1 else Joint(chosen)

    @property
    def continuous_dim(self) -> int:
        return sum(part.dim for _, part in self._parts if not part.discrete)

    def join(self, z_d: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        lead = torch.broadcast_shapes(z_d.shape[:-1], z_c.shape[:-1])
        given = {True: iter(z_d.split([p.dim for _, p in self._parts if p.discrete], -1)),
                 False: iter(z_c.split([p.dim for _, p in self._parts if not p.discrete], -1))}
        pieces = [next(given[part.discrete]) for _, part in self._parts]
        return torch.cat([piece.expand(*lead, piece.shape[-1]) for piece in pieces], -1)

    def estimand(self, f: Callable) -> tuple[Family, Callable]:
        """The discrete blocks, and f as a function of their states z_d: f(join(z_d, z_c)) with one
        reparameterised z_c = mu + sigma eps of the continuous blocks per data point (eq. 8), shared by every z_d
        an estimator decodes -- for ``exact`` each state is decoded with the same z_c, the M2 / GMVAE-style sum
        over a categorical. Conditionally on z_c the estimator is unbiased for E_{q_d}[f], and the pathwise
        gradient through z_c for the continuous parameters, so the whole gradient of E_q[f] is unbiased when the
        estimator's is."""
        q_d = self.discrete_part
        if self.discrete or q_d is None:
            return self, f
        z_c = torch.cat([part.rsample() for _, part in self._parts if not part.discrete], -1)
        return q_d, lambda z_d: f(self.join(z_d, z_c))

    def encoding(self) -> torch.Tensor:
        """The discrete block's ``probs`` when there is one (the code's probabilities), else the concatenated
        means of the blocks."""
        parts = [part for _, part in self._parts if part.discrete]
        return parts[0].encoding() if len(parts) == 1 else self.mean

    @property
    def logits(self) -> torch.Tensor:
        return torch.cat([part.logits for _, part in self._parts], -1)

    @property
    def mean(self) -> torch.Tensor:
        return torch.cat([part.mean for _, part in self._parts], -1)

    def mode(self) -> torch.Tensor:
        return torch.cat(self._each("mode"), -1)

    def code(self) -> torch.Tensor:
        """The code of the discrete block (several: side by side, as int64); the Gaussian blocks are left out."""
        codes = [part.code() for _, part in self._parts if part.discrete]
        return codes[0] if len(codes) == 1 else torch.cat([c.long() for c in codes], -1)

    def proposal(self, xi: torch.Tensor) -> "Joint":
        """The same blocks with natural parameters ``xi`` ``[..., dim]`` split among them."""
        return Joint([(name, part.proposal(x)) for (name, part), x in zip(self._parts, self._split(xi),
                                                                          strict=True)])

    def sample(self, sample_shape=()) -> torch.Tensor:
        return torch.cat(self._each("sample", sample_shape), -1)

    def relaxed_sample(self, sample_shape, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        soft, hard = zip(*self._each("relaxed_sample", sample_shape, tau), strict=True)
        return torch.cat(soft, -1), torch.cat(hard, -1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self._sum([part.log_prob(x) for (_, part), x in zip(self._parts, self._split(z), strict=True)])

    def entropy(self) -> torch.Tensor:
        return self._sum(self._each("entropy"))

    def kl_to_prior(self) -> torch.Tensor:
        return self._sum(list(self.kl_parts().values()))

    def kl_parts(self) -> dict[str, torch.Tensor]:
        return {name: part.kl_to_prior() for name, part in self._parts}

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self._sum([part.prior_log_prob(x) for (_, part), x in zip(self._parts, self._split(z), strict=True)])

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        return torch.cat(self._each("prior_sample", sample_shape), -1)

    @property
    def num_states(self) -> int | None:
        return math.prod(part.num_states for _, part in self._parts) if self.discrete else None

    def enumerate(self) -> torch.Tensor:
        """Every combination of the blocks' states (the first block varies slowest), ``[S, dim]``."""
        if not self.discrete:
            raise InputError(f"a latent with a continuous block ({self.name}) cannot be enumerated")
        _check_enumerable(self.num_states)
        tables = self._each("enumerate")
        idx = torch.cartesian_prod(*[torch.arange(len(t), device=t.device) for t in tables]).reshape(-1, len(tables))
        return torch.cat([t[idx[:, i]] for i, t in enumerate(tables)], -1)

    def state_index(self, z: torch.Tensor) -> torch.Tensor:
        index = torch.zeros(z.shape[:-1], dtype=torch.long, device=z.device)
        for (_, part), x in zip(self._parts, self._split(z), strict=True):
            index = index * part.num_states + part.state_index(x)
        return index


class Mixture(Joint):
    """A categorical y beside a Gaussian z under the prior p(y) p(z|y) = (1/c) N(z; mu_y, diag sigma_y^2) with
    learned means ``means`` ``[c, K]`` and log-variances ``logvars`` ln sigma_y^2 ``[c, K]`` (GMVAE / VaDE; None:
    sigma_y = 1): q(y, z|x) = q(y|x) q(z|x), the decoder reads z alone, and the cluster of x is argmax_y q(y|x). Its
    parts, means, codes and usage are those of the :class:`Joint` of the two blocks; what differs is z (the Gaussian
    block only) and the prior:

        KL(q || p) = KL(q(y) || 1/c) + sum_y q(y) KL(N(m, s^2) || N(mu_y, sigma_y^2)),
        KL(N(m, s^2) || N(mu, sigma^2)) = 1/2 sum(s^2 / sigma^2 + (m - mu)^2 / sigma^2 - 1 - ln s^2 + ln sigma^2),

    both in closed form (the second is the Gaussian's own KL to N(0, I) of (z - mu_y) / sigma_y), so y is summed out
    exactly (no estimator variance from the discrete part): an estimator is given the Gaussian block (``estimand``)
    and reparameterises it. ln p(z) = logsumexp_y [ln N(z; mu_y, sigma_y^2)] - ln c, the marginal of the mixture
    (for the IWAE bound). ``join(y, u)`` = mu_y + sigma_y u: the class's prior mean plus an offset in its prior's
    standard deviations, what the figures decode."""

    def __init__(self, category: Categorical, gaussian: Gaussian, means: torch.Tensor,
                 logvars: torch.Tensor | None = None):
        super().__init__([(category.name, category), (gaussian.name, gaussian)])
        self.category, self.gaussian, self.means = category, gaussian, means
        self.logvars = torch.zeros_like(means) if logvars is None else logvars

    @property
    def dim(self) -> int:
        return self.gaussian.dim

    def estimand(self, f: Callable) -> tuple[Family, Callable]:
        return self.gaussian, f

    def join(self, z_d: torch.Tensor, z_c: torch.Tensor) -> torch.Tensor:
        return z_d @ self.means.to(z_d.dtype) + (z_d @ (0.5 * self.logvars).exp().to(z_d.dtype)) * z_c

    def _standardised(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mu_y) / sigma_y for every class y: ``[..., c, K]``."""
        return (z[..., None, :] - self.means) * (-0.5 * self.logvars).exp()

    def kl_parts(self) -> dict[str, torch.Tensor]:
        # KL(N(m, s^2) || N(mu_y, sigma_y^2)) = KL(N((m - mu_y) / sigma_y, s^2 / sigma_y^2) || N(0, I)) for every y
        g = self.gaussian
        each = Gaussian.of(self._standardised(g.loc), g.logvar[..., None, :] - self.logvars).kl_to_prior()  # [B, c]
        return {self.category.name: self.category.kl_to_prior(),
                self.gaussian.name: (self.category.mean * each).sum(-1)}  # mean: q(y) [B, c], one group

    def rsample(self, sample_shape=()) -> torch.Tensor:
        return self.gaussian.rsample(sample_shape)

    def sample(self, sample_shape=()) -> torch.Tensor:
        return self.gaussian.sample(sample_shape)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.gaussian.log_prob(z)

    def mode(self) -> torch.Tensor:
        return self.gaussian.mode()

    def entropy(self) -> torch.Tensor:
        return self.gaussian.entropy()

    def prior_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        # ln N(z; mu_y, sigma_y^2) = ln N((z - mu_y) / sigma_y; 0, I) - sum ln sigma_y, for every y: [..., c]
        each = self.gaussian.prior_log_prob(self._standardised(z)) - 0.5 * self.logvars.sum(-1)
        return torch.logsumexp(each, -1) - math.log(len(self.means))

    def prior_sample(self, sample_shape=()) -> torch.Tensor:
        y = torch.randint(len(self.means), _shape(sample_shape), device=self.means.device)
        noise = torch.randn(*y.shape, self.dim, dtype=self.means.dtype, device=self.means.device)
        return self.means[y] + (0.5 * self.logvars[y]).exp() * noise


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
    if isinstance(q, Family):
        return q
    base = q.base_dist if isinstance(q, td.Independent) and q.reinterpreted_batch_ndims == 1 else q
    for kind, convert in FROM_TORCH.items():
        if isinstance(base, kind):
            return convert(base)
    raise InputError(f"an estimator takes a discvae Bernoulli, Categorical or Gaussian, or a torch.distributions "
                     f"Bernoulli, OneHotCategorical or Normal (also in Independent(..., 1)), not "
                     f"{q if isinstance(q, td.Distribution) else type(q).__name__}")


def sampling():
    """The context of a latent's random draw: none, or while stacked runs step (:mod:`discvae.stacked`) their
    ``RunStreams``, which draws each run's part from that run's own stream (``SAMPLING``)."""
    return SAMPLING.get() or nullcontext()


def _shape(sample_shape) -> torch.Size:
    """torch's ``sample_shape``, an int n meaning ``(n,)``."""
    return torch.Size((sample_shape,) if isinstance(sample_shape, int) else sample_shape)


def _dot(z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_i z[..., i] a[..., i]; states ``z`` of shape ``[S, 1, dim]`` shared by a batch ``a`` ``[B, dim]`` give
    ``[S, B]`` by one matmul (what ``exact`` needs) instead of an ``[S, B, dim]`` product."""
    if z.dim() == 3 and z.shape[1] == 1 and a.dim() == 2:
        with no_autocast(a.device):  # a sum of log-space terms: fp32 under bf16 autocast too
            return z.squeeze(1) @ a.T
    return (z * a).sum(-1)


def _digits_to_index(digits: torch.Tensor, base: int) -> torch.Tensor:
    """Digits ``[..., n]`` read as numbers in ``base``, most significant first."""
    weights = base ** torch.arange(digits.shape[-1] - 1, -1, -1, device=digits.device)
    return (digits * weights).sum(-1)


def _check_enumerable(n_states: int) -> None:
    if n_states > MAX_ENUMERATE:
        raise InputError(f"{n_states} latent states are too many to enumerate (limit {MAX_ENUMERATE})")
