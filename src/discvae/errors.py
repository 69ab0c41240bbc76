"""Exceptions for bad user input: the CLI prints their message on one line and exits with status 2."""


class InputError(ValueError):
    """Bad arguments, missing or corrupt files, incompatible checkpoints."""


class Diverged(InputError):
    """Training met a non-finite loss or gradient (too large a learning rate, too small a temperature)."""
