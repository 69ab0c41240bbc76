"""discvae: variational autoencoders with discrete latent variables (Bartler et al. 2019 and successors)."""
from .data import Dataset, load_dataset
from .distributions import Bernoulli, Categorical, Gaussian
from .errors import InputError
from .estimators import ESTIMATORS
from .models import VAE, build_model
from .training import Config, load_run, train

__all__ = ["Bernoulli", "Categorical", "Config", "Dataset", "ESTIMATORS", "Gaussian", "InputError", "VAE",
           "build_model", "load_dataset", "load_run", "train"]
__version__ = "0.1.0"
