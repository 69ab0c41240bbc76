"""discvae: variational autoencoders with discrete latent variables (Bartler et al. 2019 and successors).

The names below are imported from their modules on first use, so ``import discvae`` itself is instant and does
nothing else.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {"Bernoulli": "distributions", "Categorical": "distributions", "Gaussian": "distributions",
            "Config": "training", "train": "training", "load_run": "training", "Dataset": "data",
            "load_dataset": "data", "InputError": "errors", "Diverged": "errors", "ESTIMATORS": "estimators",
            "Estimator": "estimators", "make_estimator": "estimators", "VAE": "models", "build_model": "models"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
