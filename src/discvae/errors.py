"""The one exception type for bad user input: the CLI prints its message on one line and exits with status 2."""


class InputError(ValueError):
    """Bad arguments, missing or corrupt files, incompatible checkpoints."""
