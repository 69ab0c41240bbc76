"""The shape of a latent: which families, what sizes, parsed from ``--latent``.

A :class:`LatentSpace` is one or more :class:`Block` s -- a family of :mod:`discvae.distributions` with its size --
concatenated in z (``LatentSpace.parse("categorical:10+gaussian:10")``), and its prior: each block's own
(``standard``), a factorised prior with ``learned`` logits for the discrete blocks (:class:`LearnedPrior`) or, for a
categorical beside a Gaussian, the ``mixture`` p(y) p(z|y) with learned means (``mixture-var``: and variances;
:class:`MixturePrior`). It sizes the encoder's output and the decoder's input, counts the latent states, and builds
q(z|x) from an encoder's output: the block's family, a :class:`~discvae.distributions.Joint` of the blocks, or a
:class:`~discvae.distributions.Mixture`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .distributions import Bernoulli, Categorical, Family, Gaussian, Joint, Mixture
from .errors import InputError

FAMILIES = {family.name: family for family in (Bernoulli, Categorical, Gaussian)}
DEFAULT_SIZE = 50
MIXTURES = ("mixture", "mixture-var")  # the priors p(y) p(z|y): unit variances, learned variances
PRIORS = ("standard", "learned", *MIXTURES)
MAX_WIDTH = 2**31 - 1  # the most coordinates of a latent block or units of a layer (a tensor's dimension in int32)
_BLOCK = re.compile(r"(?P<family>[a-z]+)(?::(?P<size>\d+)(?:x(?P<groups>\d+))?)?")


@dataclass(frozen=True)
class Block:
    """One family with its sizes: ``size`` bits, classes per group (``groups`` groups) or Gaussian dimensions."""

    family: type
    size: int
    groups: int = 1

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def param_dim(self) -> int:
        return self.family.param_dim(self.size, self.groups)

    @property
    def dim(self) -> int:
        return self.family.dim_of(self.size, self.groups)

    @property
    def num_states(self) -> int | None:
        return self.family.states_of(self.size, self.groups)

    def __str__(self) -> str:
        return f"{self.name}:{self.size}" + (f"x{self.groups}" if self.groups > 1 else "")


@dataclass(frozen=True)
class LatentSpace:
    """The shape of a latent: one or more blocks, concatenated in z. It sizes the encoder's output
    (``param_dim``) and the decoder's input (``dim``), counts states, and builds q(z|x) from the encoder's output:
    the block's family, or a :class:`Joint` of the blocks."""

    blocks: tuple[Block, ...]
    prior: str = "standard"

    @staticmethod
    def sizes_itself(spec: str) -> bool:
        """Whether every block of the latent ``spec`` gives its own size (``family:size``, alone or joined by ``+``),
        so that ``latent_dim`` and ``groups`` must be left out."""
        return all(m and m["size"] for m in map(_BLOCK.fullmatch, spec.split("+")))

    @classmethod
    def parse(cls, spec: str, size: int | None = None, groups: int = 1, prior: str = "standard") -> "LatentSpace":
        """``spec``: a family name sized by ``size`` (default 50) and ``groups`` -- ``bernoulli``, ``categorical``,
        ``gaussian`` -- or blocks ``family:size`` joined by ``+``, a categorical block as ``categorical:c`` or
        ``categorical:cxG`` (G groups), e.g. ``categorical:10+gaussian:10``; a block without its size takes ``size``
        and ``groups`` (``bernoulli+gaussian:16`` with ``size`` 32 is ``bernoulli:32+gaussian:16``), and when every
        block gives its size they must be left out. At most one block per family. ``prior``: ``standard`` (each
        block's own: uniform, N(0, I)), ``learned`` (the discrete blocks' bits and classes with learned
        probabilities, :class:`LearnedPrior`) or ``mixture`` (``categorical:c+gaussian:K`` only: p(y) p(z|y) = (1/c)
        N(z; mu_y, I), the decoder reading z) or ``mixture-var`` (the same with learned variances, N(z; mu_y, diag
        sigma_y^2): VaDE's prior). InputError on anything else."""
        if prior not in PRIORS:
            raise InputError(f"unknown prior {prior!r}; choose one of {', '.join(PRIORS)}", "prior")
        if not isinstance(spec, str):
            raise InputError(f"latent must be a string such as bernoulli or categorical:10+gaussian:10, not {spec!r}")
        parts = [_BLOCK.fullmatch(part) for part in spec.split("+")]
        if cls.sizes_itself(spec):
            if size is not None or groups != 1:
                raise InputError(f"latent {spec!r} gives its own sizes; leave out latent_dim and groups",
                                 "latent_dim", "groups")
        blocks = []
        for text, m in zip(spec.split("+"), parts, strict=True):
            if m is None or m["family"] not in FAMILIES:
                raise InputError(f"latent block {text!r} is not one of bernoulli, categorical, gaussian, each with "
                                 f"its size or without (e.g. categorical:10+gaussian:10, bernoulli+gaussian:16)",
                                 "latent")
            family = FAMILIES[m["family"]]
            block = Block(family, int(m["size"]) if m["size"] else (size if size is not None else DEFAULT_SIZE),
                          int(m["groups"] or (1 if m["size"] else groups)))
            if block.groups != 1 and not family.grouped:
                raise InputError(f"groups applies to a categorical latent, not to a {family.name} one", "groups")
            if block.size < family.min_size or block.groups < 1:
                raise InputError(f"latent block {block} is too small: at least {family.min_size} "
                                 f"{'classes' if family.grouped else 'dimension'} and 1 group", "latent_dim")
            if block.size * block.groups > MAX_WIDTH:
                raise InputError(f"latent block {block} is too large: at most {MAX_WIDTH} coordinates",
                                 "latent_dim")
            blocks.append(block)
        names = [b.name for b in blocks]
        if len(set(names)) < len(names):
            raise InputError(f"latent {spec!r} repeats a family; give each family once (a categorical with several "
                             f"groups is categorical:CxG)", "latent")
        shape = [(b.family, b.groups) for b in blocks]
        if prior in MIXTURES and shape != [(Categorical, 1), (Gaussian, 1)]:
            raise InputError(f"prior {prior} needs a latent categorical:C+gaussian:K (one group), not {spec!r}",
                             "prior")
        if prior == "learned" and all(b.num_states is None for b in blocks):
            raise InputError(f"prior learned needs a latent with a discrete block (bits or classes), not {spec!r}",
                             "prior")
        return cls(tuple(blocks), prior)

    def __str__(self) -> str:
        return "+".join(map(str, self.blocks))

    @property
    def mixture(self) -> bool:
        """Whether the prior is a mixture p(y) p(z|y) (``mixture`` or ``mixture-var``)."""
        return self.prior in MIXTURES

    @property
    def param_dim(self) -> int:
        return sum(b.param_dim for b in self.blocks)

    @property
    def dim(self) -> int:
        """The length of z, what the decoder reads: the blocks side by side; with the mixture prior, z alone."""
        return self.blocks[-1].dim if self.mixture else sum(b.dim for b in self.blocks)

    @property
    def discrete(self) -> bool:
        return all(b.num_states is not None for b in self.blocks)

    @property
    def num_states(self) -> int | None:
        """The number of latent states (2^c bits, c^G categories, their product), None if any block is continuous."""
        return math.prod(b.num_states for b in self.blocks) if self.discrete else None

    @property
    def code_block(self) -> Block | None:
        """The block whose states are the code (``VAE.codes``) when there is one discrete block, else None."""
        discrete = [b for b in self.blocks if b.num_states is not None]
        return discrete[0] if len(discrete) == 1 else None

    def prior_module(self) -> "MixturePrior | LearnedPrior | None":
        """The prior's learned parameters as a module for the VAE to hold, None for the standard priors."""
        if self.mixture:
            return MixturePrior(self.blocks[0].size, self.blocks[1].size, variances=self.prior == "mixture-var")
        return LearnedPrior(self.blocks) if self.prior == "learned" else None

    def posterior(self, params: torch.Tensor, prior: "MixturePrior | LearnedPrior | None" = None) -> Family:
        """q(z|x) from the encoder's output ``params`` ``[..., param_dim]``, with the learned ``prior`` of
        ``prior_module()`` when there is one."""
        if self.prior != "standard" and prior is None:
            raise ValueError(f"a latent with the {self.prior} prior needs that prior's module (VAE.prior)")
        learned = prior.logits if self.prior == "learned" else {}
        chunks = params.split([b.param_dim for b in self.blocks], -1)
        parts = [b.family.from_params(c, b.groups, learned.get(b.name))
                 for b, c in zip(self.blocks, chunks, strict=True)]
        if len(parts) == 1:
            return parts[0]
        if self.mixture:
            return Mixture(*parts, prior.means, prior.logvars)
        return Joint([(b.name, part) for b, part in zip(self.blocks, parts, strict=True)])


class MixturePrior(nn.Module):
    """The learned means mu_y ``[c, K]`` of the mixture prior p(z|y) = N(mu_y, diag sigma_y^2), drawn from N(0, I)
    at the start (zeros would leave every class the same prior and nothing to tell them apart), and its log-variances
    ln sigma_y^2 ``[c, K]``: learned from 0 with ``variances`` (VaDE's prior), else fixed at 0 (sigma_y = 1) and not
    saved (a buffer outside the state dict)."""

    def __init__(self, classes: int, dim: int, variances: bool = False):
        super().__init__()
        self.means = nn.Parameter(torch.randn(classes, dim))
        if variances:
            self.logvars = nn.Parameter(torch.zeros(classes, dim))
        else:
            self.register_buffer("logvars", torch.zeros(classes, dim), persistent=False)


class LearnedPrior(nn.Module):
    """The learned logits lambda of a factorised prior over the discrete blocks, ``logits[block name]``:
    p(z) = Bernoulli(sigmoid(lambda)) for bits, softmax(lambda_g) for each categorical group; zeros at the start
    (the uniform prior). Gaussian blocks keep N(0, I). The prior of the ARM / DisARM benchmark code (200 learned
    logits for the 200 bits)."""

    def __init__(self, blocks: tuple[Block, ...]):
        super().__init__()
        self.logits = nn.ParameterDict({b.name: nn.Parameter(torch.zeros(b.param_dim))
                                        for b in blocks if b.num_states is not None})
