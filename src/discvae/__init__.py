"""discvae: variational autoencoders with discrete latent variables (Bartler et al. 2019 and successors).

The names below are imported from their modules on first use, so ``import discvae`` itself is instant and does
nothing else (it imports neither torch nor matplotlib). The core is the top-level modules; ``discvae.experiments``
(``compare``, ``reproduce``) and ``discvae.applications`` (``codes``, ``retrieval``, ``search``, ``clustering``) are
built on it.
"""
import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Bernoulli", "Callback", "Categorical", "Config", "Dataset", "Diverged", "ESTIMATORS", "Estimator",
           "Gaussian", "InputError", "LearnedEstimator", "VAE", "build_model", "load_dataset", "load_run",
           "make_estimator", "train"]

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports each name on first use
    from .callbacks import Callback
    from .config import Config
    from .data import Dataset, load_dataset
    from .distributions import Bernoulli, Categorical, Gaussian
    from .errors import Diverged, InputError
    from .estimators import ESTIMATORS, Estimator, make_estimator
    from .learned import LearnedEstimator
    from .models import VAE, build_model
    from .training import load_run, train

_EXPORTS = {"Bernoulli": "distributions", "Categorical": "distributions", "Gaussian": "distributions",
            "Config": "config", "train": "training", "load_run": "training", "Dataset": "data",
            "load_dataset": "data", "InputError": "errors", "Diverged": "errors", "ESTIMATORS": "estimators",
            "Estimator": "estimators", "make_estimator": "estimators",
            "LearnedEstimator": "learned", "VAE": "models", "build_model": "models",
            "Callback": "callbacks"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
