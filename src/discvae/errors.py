"""Exceptions for bad user input (the CLI prints their message on one line and exits with status 2), and the
predicates that tell a number of the kind a setting needs: a real number is an int or float, never a bool or text."""
import math
import re


class InputError(ValueError):
    """Bad arguments, missing or corrupt files, incompatible checkpoints.

    The message names parameters as Python spells them (``num_samples must be ...``); ``params`` lists the names it
    mentions, so that a front end can show its own names for them (:meth:`renamed`).
    """

    def __init__(self, message: str, *params: str):
        super().__init__(message)
        self.params = params

    def renamed(self, rename) -> str:
        """The message with each whole-word occurrence of a name in ``params`` replaced by ``rename(name)``."""
        if not self.params:
            return str(self)
        pattern = r"\b(" + "|".join(map(re.escape, self.params)) + r")\b"
        return re.sub(pattern, lambda m: rename(m[1]), str(self))


class Diverged(InputError):
    """Training met a non-finite loss or gradient (too large a learning rate, too small a temperature)."""


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_finite(v) -> bool:
    return finite(v) and v > 0


def non_negative_finite(v) -> bool:
    return finite(v) and v >= 0
