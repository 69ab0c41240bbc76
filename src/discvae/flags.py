"""Command-line flags generated from settings dataclasses.

A settings dataclass (:class:`~discvae.config.Config`, :class:`~discvae.experiments.compare.Comparison`,
:class:`~discvae.experiments.reproduce.Reproduction`) declares each field's flag in its metadata with
:func:`setting`, and the command line is built from that alone: adding a field with a :class:`Flag` is all it takes
to get a flag with its help, in every subcommand that takes the dataclass.

* A scalar field has one flag named after it (``latent_dim`` -> ``--latent-dim``), read with the type of its
  annotation (``int``, ``float``, ``str``, ``str | None``; ``bool`` is a switch; ``list[int]`` one or more ints)
  unless the flag gives its own ``type``, a function of the text.
* A dict field has one flag per key (``Flag(..., key="num_samples")``: ``--num-samples 2`` sets
  ``estimator_options["num_samples"]``), the keys given merged into the field's default; and/or one flag whose
  ``type`` reads a dict of entries, given once per entry (``--capacity categorical=2:100 --capacity ...``); a key
  set by two flags is refused.

:func:`add_flags` adds the flags to an ``argparse`` parser; a flag not given is absent from the parsed namespace
(so that a caller can tell what was given), unless a default for it is passed. :func:`given` reads the settings
back, :func:`build` makes the dataclass of them, :func:`changed` names the flags given that differ from saved
settings, and :func:`documented` writes the flags' help into the dataclass's docstring.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass

from .errors import InputError


@dataclass(frozen=True)
class Flag:
    """How the command line sets a field (or one key of a dict field).

    Attributes:
        help: what the setting does; the default is appended unless the text mentions one.
        type: the function reading the text (default: from the field's annotation; ``str`` for a key).
        choices: the values accepted, if only these.
        metavar: the name of the value (or of each of ``nargs`` values) in the help.
        nargs: the number of values, as argparse's ``nargs``.
        key: for a dict field, the key this flag sets.
        name: the flag without its dashes and with ``_`` for ``-`` (default: the key, else the field's name).
    """

    help: str
    type: Callable[[str], typing.Any] | None = None
    choices: Sequence | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None
    key: str | None = None
    name: str | None = None


def setting(default=MISSING, *flags: Flag, factory=MISSING, section: str | None = None):
    """A dataclass field with ``default`` (or ``factory`` making it) that the command line sets through ``flags``
    (one for a scalar field, one per key for a dict field; none: not on the command line), listed in ``--help``
    under the heading ``section`` (none: with the command's other options)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"flags": flags, "section": section})


def documented(cls):
    """Class decorator of a settings dataclass: its docstring gains an ``Attributes:`` section (Google style) made
    of its flags' help, so that Python's help and the command line's are one text."""
    lines = [inspect.cleandoc(cls.__doc__ or cls.__name__), "", "Attributes:"]
    for f in dataclasses.fields(cls):
        specs = f.metadata.get("flags", ())
        if specs:
            text = "; ".join((f"{spec.key}: " if spec.key else "") + _help(spec, _default(f, spec.key))
                             for spec in specs)
            lines.append(textwrap.fill(text, 116, initial_indent=f"    {f.name}: ", subsequent_indent=" " * 8))
    cls.__doc__ = "\n".join(lines)
    return cls


def flag(name: str) -> str:
    """The command-line flag of a setting or parameter: ``num_samples`` -> ``--num-samples``."""
    return "--" + name.replace("_", "-")


def _flags(cls):
    """``(field, flag, name)`` for every flag of the fields of ``cls``."""
    for f in dataclasses.fields(cls):
        for spec in f.metadata.get("flags", ()):
            yield f, spec, spec.name or spec.key or f.name


def _dest(cls, name: str) -> str:
    """The attribute of flag ``name`` of ``cls`` in the parsed namespace (qualified: two dataclasses of one parser
    may have flags of the same name, one of them skipped)."""
    return f"{cls.__qualname__}.{name}"


def _default(f: dataclasses.Field, key: str | None):
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    return value.get(key, MISSING) if key else value


def _per_entry(f: dataclasses.Field, spec: Flag) -> bool:
    """Whether ``spec`` sets the whole dict field ``f``, given once per entry."""
    return not spec.key and isinstance(_default(f, None), dict)


def _help(spec: Flag, default) -> str:
    """The help of ``spec`` with its ``default`` (none shown for None, False, an empty list or dict, or none)."""
    shown = default is not MISSING and default is not None and default is not False and default not in ([], {})
    return spec.help + (f" (default {default})" if shown and "(default" not in spec.help else "")


def _kind(hint):
    """``(type, nargs)`` for an annotation: ``list[int]`` -> ``(int, "+")``, ``str | None`` -> ``(str, None)``."""
    if typing.get_origin(hint) in (list, tuple):
        return typing.get_args(hint)[0], "+"
    kinds = [k for k in typing.get_args(hint) or (hint,) if k is not type(None)]
    return kinds[0], None


def add_flags(parser: argparse.ArgumentParser, cls, skip=(), defaults=None) -> None:
    """Add to ``parser`` the flags of the fields of the dataclass ``cls``, each field's under its ``section`` (an
    argument group of that title).

    Args:
        parser: the parser (or subcommand parser) to add them to.
        cls: a dataclass whose fields were made with :func:`setting`.
        skip: names of fields and of flags to leave out.
        defaults: flag name (``num_samples``) -> the value it has when not given (shown in its help); every
            other flag not given is absent from the namespace. A field without a default becomes a required flag.
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    sections = {None: parser}
    for f, spec, name in _flags(cls):
        if f.name in skip or name in skip:
            continue
        kind, nargs = _kind(hints[f.name])
        default = defaults.get(name, _default(f, spec.key))
        options = {"dest": _dest(cls, name), "help": _help(spec, default),
                   "default": defaults.get(name, argparse.SUPPRESS),
                   "required": default is MISSING and not spec.key}
        if kind is bool and not spec.key:
            options["action"] = "store_true"
        else:
            if _per_entry(f, spec):
                options["action"] = "append"
            options.update(type=spec.type or (str if spec.key else kind), nargs=spec.nargs or nargs,
                           choices=spec.choices, metavar=spec.metavar or (None if spec.choices else name.upper()))
        section = f.metadata.get("section")
        if section not in sections:
            sections[section] = parser.add_argument_group(section)
        sections[section].add_argument(flag(name), **options)


def _given(args: argparse.Namespace, cls):
    """``(field, flag, name, value)`` for each flag of ``cls`` that ``args`` holds (a flag given per entry: the dict
    of all its entries)."""
    for f, spec, name in _flags(cls):
        if hasattr(args, _dest(cls, name)):
            value = getattr(args, _dest(cls, name))
            if _per_entry(f, spec):
                keys = [key for entry in value for key in entry]
                twice = sorted({key for key in keys if keys.count(key) > 1})
                if twice:
                    raise InputError(f"{flag(name)} is given more than once for {', '.join(twice)}")
                value = {key: v for entry in value for key, v in entry.items()}
            yield f, spec, name, value


def given(args: argparse.Namespace, cls) -> dict:
    """The settings of ``cls`` in the parsed ``args`` (the flags given and those with a default): field name ->
    value, a dict field's flags giving the dict of their keys."""
    values = {}
    for f, spec, name, value in _given(args, cls):
        entries = {spec.key: value} if spec.key else value if _per_entry(f, spec) else None
        if entries is None:
            values[f.name] = value
            continue
        twice = sorted(set(values.get(f.name, {})) & set(entries))
        if twice:
            raise InputError(f"{', '.join(twice)} is given twice (by {flag(name)} and another flag)")
        values[f.name] = {**values.get(f.name, {}), **entries}
    return values


def changed(args: argparse.Namespace, saved, skip=()) -> list[str]:
    """The flags in ``args`` whose values would change the settings ``saved`` (a dataclass instance); the flags of
    the fields in ``skip`` are left out."""
    flags = []
    for f, spec, name, value in _given(args, type(saved)):
        old = getattr(saved, f.name)
        if f.name not in skip and (old.get(spec.key) if spec.key else old) != (
                {**old, **value} if _per_entry(f, spec) else value):
            flags.append(flag(name))
    return flags


def build(cls, values: dict, **fixed):
    """``cls(**values, **fixed)``, the keys given for a dict field merged into its default (``--proposal uniform``
    keeps the default ``num_samples``)."""
    merged = {}
    for f in dataclasses.fields(cls):
        if isinstance(values.get(f.name), dict) and isinstance(_default(f, None), dict):
            merged[f.name] = {**_default(f, None), **values[f.name]}
    return cls(**{**values, **merged, **fixed})
