"""Flags generated from settings dataclasses (``discvae.flags``): a field declared with its ``Flag`` is a flag."""
import argparse
import dataclasses
from dataclasses import MISSING, dataclass

import pytest

from discvae import Config, InputError, cli, flags
from discvae.estimators import OPTION_FLAGS
from discvae.flags import Flag, add_flags, build, flag, given, setting


def pairs(text: str) -> dict:
    """A parser function for a dict-valued field: ``cat=5,gauss=2``."""
    return {key: float(value) for key, value in (pair.split("=") for pair in text.split(","))}


@dataclass
class Settings:
    out: str = setting(MISSING, Flag("where"))
    rate: float = setting(0.5, Flag("a rate"))
    name: str | None = setting(None, Flag("a name", choices=("a", "b")))
    fast: bool = setting(False, Flag("go fast"))
    seeds: list[int] = setting(MISSING, Flag("seeds", metavar="SEED"), factory=list)
    capacity: dict = setting(MISSING, Flag("capacity of a block, BLOCK=NATS[,...]", type=pairs), factory=dict)
    options: dict = setting(MISSING, Flag("samples", type=int, key="num_samples"),
                            Flag("temperature", type=float, key="tau", name="temperature"),
                            Flag("any other option", type=pairs, name="option"),
                            factory=lambda: {"num_samples": 1})
    hidden: int = 3  # no flag


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test")
    add_flags(p, Settings, **kwargs)
    return p


def test_every_kind_of_field_becomes_a_flag():
    args = parser().parse_args(["--out", "o", "--rate", "2", "--name", "b", "--fast", "--seeds", "3", "4",
                                "--capacity", "cat=5,gauss=2", "--capacity", "bits=1", "--temperature", "0.3"])
    values = given(args, Settings)
    assert values == {"out": "o", "rate": 2.0, "name": "b", "fast": True, "seeds": [3, 4],
                      "capacity": {"cat": 5.0, "gauss": 2.0, "bits": 1.0}, "options": {"tau": 0.3}}
    settings = build(Settings, values)
    assert settings.options == {"num_samples": 1, "tau": 0.3} and settings.hidden == 3  # keys merged into the default
    assert given(parser().parse_args(["--out", "o"]), Settings) == {"out": "o"}  # what is not given is absent


def test_a_dict_field_takes_its_keys_flags_and_entries_together_and_refuses_a_key_twice():
    args = parser().parse_args(["--out", "o", "--temperature", "0.3", "--option", "width=8", "--option", "depth=2"])
    assert given(args, Settings)["options"] == {"tau": 0.3, "width": 8.0, "depth": 2.0}
    assert build(Settings, given(args, Settings)).options == {"num_samples": 1, "tau": 0.3, "width": 8.0,
                                                              "depth": 2.0}
    args = parser().parse_args(["--out", "o", "--temperature", "0.3", "--option", "tau=0.5"])
    with pytest.raises(InputError, match="^tau is given twice"):
        given(args, Settings)


def test_help_defaults_required_flags_and_skip(capsys):
    p = parser(skip=("seeds", "num_samples"), defaults={"rate": 0.25})
    text = " ".join(p.format_help().split())
    assert "--rate RATE a rate (default 0.25)" in text and "--temperature TEMPERATURE temperature" in text
    assert "--name {a,b} a name --fast go fast --capacity" in text  # no default shown for None and False
    assert not {"--seeds", "--num-samples", "--hidden"} & set(text.split())
    assert given(p.parse_args(["--out", "o"]), Settings) == {"out": "o", "rate": 0.25}
    with pytest.raises(SystemExit):
        p.parse_args([])
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_train_has_a_flag_for_every_setting_of_config():
    commands = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    train = commands["train"]
    options = {o for a in train._actions for o in a.option_strings}
    for f in dataclasses.fields(Config):
        names = [spec.name or spec.key or f.name for spec in f.metadata["flags"]]
        assert names and {flag(n) for n in names} <= options, f.name


def test_a_field_added_to_config_is_a_flag_of_every_command_that_takes_config(monkeypatch, tmp_path):
    @dataclass
    class Extended(Config):
        precision: str = setting("fp32", Flag("arithmetic", choices=("fp32", "bf16")))

    monkeypatch.setattr(cli, "Config", Extended)
    p = cli.build_parser()
    for argv in (["train"], ["compare", "rloo", "--out", "c"], ["reproduce", "--out", "r"]):
        args = p.parse_args([*argv, "--precision", "bf16"])
        assert build(Extended, given(args, Extended)).precision == "bf16"
    assert build(Extended, given(p.parse_args(["train"]), Extended)).precision == "fp32"


def test_the_docstring_of_a_settings_dataclass_lists_its_flags_help():
    documented = flags.documented(dataclasses.make_dataclass("Doc", [
        ("rate", float, setting(0.5, Flag("a rate"))), ("hidden", int, dataclasses.field(default=3))]))
    assert documented.__doc__.endswith("\n\nAttributes:\n    rate: a rate (default 0.5)")
    assert "    latent_dim: bits, classes per group, or Gaussian dims (default 50)\n" in Config.__doc__


def test_the_estimator_options_named_as_flags_in_errors_are_those_with_a_flag():
    """``OPTION_FLAGS``: an estimator's error names these as parameters, which the CLI shows as flags; any other
    option is set by ``--estimator-option`` and keeps its own name."""
    field = next(f for f in dataclasses.fields(Config) if f.name == "estimator_options")
    assert {spec.key for spec in field.metadata["flags"] if spec.key} == set(OPTION_FLAGS)
