"""Named recipes for ``discvae train --preset NAME``: plain settings files shipped with the package.

Each preset is a JSON object of :class:`~discvae.config.Config` settings in the format of a run's ``config.json``
(only the settings it fixes; the rest keep their defaults). ``discvae train --preset hashing --print-config`` prints
the whole configuration it makes, which can be copied, edited and passed back with ``--config FILE``; any flag given
beside a preset or a file overrides its value.
"""
from __future__ import annotations

import json
from importlib import resources

from ..errors import InputError

PRESETS = ("hashing", "clustering")


def preset(name: str) -> dict:
    """The settings of the preset ``name`` (one of :data:`PRESETS`)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", "preset")
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text("utf-8"))
