"""The shape of a latent: which families, what sizes, parsed from ``--latent``.

A :class:`LatentSpace` is one or more :class:`Block` s -- a family of :mod:`discvae.distributions` with its size --
concatenated in z (``LatentSpace.parse("categorical:10+gaussian:10")``). It sizes the encoder's output and the
decoder's input, counts the latent states, and builds q(z|x) from an encoder's output: the block's family, or a
:class:`~discvae.distributions.Joint` of the blocks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .distributions import Bernoulli, Categorical, Family, Gaussian, Joint
from .errors import InputError

FAMILIES = {family.name: family for family in (Bernoulli, Categorical, Gaussian)}
DEFAULT_SIZE = 50
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

    @classmethod
    def parse(cls, spec: str, size: int | None = None, groups: int = 1) -> "LatentSpace":
        """``spec``: a family name sized by ``size`` (default 50) and ``groups`` -- ``bernoulli``, ``categorical``,
        ``gaussian`` -- or blocks ``family:size`` joined by ``+``, a categorical block as ``categorical:c`` or
        ``categorical:cxG`` (G groups), e.g. ``categorical:10+gaussian:10``; then ``size`` and ``groups`` must be
        left out. At most one block per family. InputError on anything else."""
        if not isinstance(spec, str):
            raise InputError(f"latent must be a string such as bernoulli or categorical:10+gaussian:10, not {spec!r}")
        parts = [_BLOCK.fullmatch(part) for part in spec.split("+")]
        sized = any(m and m["size"] for m in parts)
        if len(parts) > 1 or sized:
            if size is not None or groups != 1:
                raise InputError(f"latent {spec!r} gives its own sizes; leave out latent_dim and groups",
                                 "latent_dim", "groups")
        blocks = []
        for text, m in zip(spec.split("+"), parts, strict=True):
            if m is None or m["family"] not in FAMILIES or (len(parts) > 1 and not m["size"]):
                raise InputError(f"latent block {text!r} is not one of bernoulli:N, categorical:C, categorical:CxG, "
                                 f"gaussian:N (e.g. categorical:10+gaussian:10)", "latent")
            family = FAMILIES[m["family"]]
            block = Block(family, int(m["size"]) if m["size"] else (size if size is not None else DEFAULT_SIZE),
                          int(m["groups"] or (groups if not sized else 1)))
            if block.groups != 1 and not family.grouped:
                raise InputError(f"groups applies to a categorical latent, not to a {family.name} one", "groups")
            if block.size < family.min_size or block.groups < 1:
                raise InputError(f"latent block {block} is too small: at least {family.min_size} "
                                 f"{'classes' if family.grouped else 'dimension'} and 1 group", "latent_dim")
            blocks.append(block)
        names = [b.name for b in blocks]
        if len(set(names)) < len(names):
            raise InputError(f"latent {spec!r} repeats a family; give each family once (a categorical with several "
                             f"groups is categorical:CxG)", "latent")
        return cls(tuple(blocks))

    def __str__(self) -> str:
        return "+".join(map(str, self.blocks))

    @property
    def param_dim(self) -> int:
        return sum(b.param_dim for b in self.blocks)

    @property
    def dim(self) -> int:
        return sum(b.dim for b in self.blocks)

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

    def posterior(self, params: torch.Tensor) -> Family:
        """q(z|x) from the encoder's output ``params`` ``[..., param_dim]``."""
        if len(self.blocks) == 1:
            return self.blocks[0].family.from_params(params, self.blocks[0].groups)
        chunks = params.split([b.param_dim for b in self.blocks], -1)
        return Joint([(b.name, b.family.from_params(c, b.groups)) for b, c in zip(self.blocks, chunks, strict=True)])
