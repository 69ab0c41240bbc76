"""The ``discvae`` command: ``train``, ``reconstruct``.

Bad input ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from .data import DATASETS
from .distributions import FAMILIES
from .errors import InputError
from .estimators import BASELINES, ESTIMATORS
from .likelihoods import BINARIZE, LIKELIHOODS
from .models import ARCHS
from .runs import read_config
from .training import RESUMABLE, Config, load_run, train


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# CLI flag -> key of Config.estimator_options; each estimator function takes these keywords.
ESTIMATOR_FLAGS = {"num_samples": "num_samples", "proposal": "proposal", "baseline": "baseline"}


def _add_train(sub):
    d = Config()
    p = sub.add_parser("train", help="train a VAE", description="Train a VAE; defaults are the paper's MNIST "
                       "settings (Adam, lr 1e-3, batch 2048, 300 epochs).", argument_default=argparse.SUPPRESS)
    p.add_argument("--dataset", help=f"{', '.join(DATASETS)} or a .npy/.npz file (default {d.dataset})")
    p.add_argument("--data-dir", help="folder holding mnist/ and fashion-mnist/ (default $DISCVAE_DATA, "
                   "else ~/.cache/discvae)")
    p.add_argument("--download", action="store_true", help="fetch missing MNIST/Fashion-MNIST files")
    p.add_argument("--arch", choices=ARCHS, help=f"Table I architecture (default {d.arch})")
    p.add_argument("--latent", choices=list(FAMILIES), help=f"latent family (default {d.latent})")
    p.add_argument("--latent-dim", type=int, help=f"bits, classes per group, or Gaussian dims (default {d.latent_dim})")
    p.add_argument("--groups", type=int, help="independent categorical groups (default 1)")
    p.add_argument("--likelihood", choices=list(LIKELIHOODS), help=f"p(x|z) (default {d.likelihood})")
    p.add_argument("--binarize", choices=BINARIZE, help=f"data binarisation (default {d.binarize})")
    p.add_argument("--estimator", choices=list(ESTIMATORS), help=f"gradient estimator (default {d.estimator})")
    p.add_argument("--num-samples", type=int, help="samples of z per data point, M (default 1)")
    p.add_argument("--proposal", choices=("posterior", "uniform"),
                   help="importance proposal q_I: xi = eta (default, eq. 23/29) or uniform (xi = 0)")
    p.add_argument("--baseline", choices=BASELINES, help="control variate of the importance estimator: none "
                   "(default, the paper), mean (over the rest of the batch) or loo (over the other M-1 samples)")
    p.add_argument("--epochs", type=int, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, help=f"fixes every random number (default {d.seed})")
    p.add_argument("--grad-var-every", type=int, help="record gradient variance every N epochs (default 1, 0: never)")
    p.add_argument("--grad-var-repeats", type=int, help="independent gradient estimates R for it (default 16)")
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--out", help="run directory (default runs/DATASET-ARCH-LATENTDIM-ESTIMATOR-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    given = vars(args)
    resume = given.pop("resume", False)
    quiet = given.pop("quiet", False)
    options = {ESTIMATOR_FLAGS[k]: given.pop(k) for k in list(given) if k in ESTIMATOR_FLAGS}
    fields = {f.name for f in dataclasses.fields(Config)}
    if resume:
        if "out" not in given:
            raise InputError("--resume needs --out RUN_DIR")
        saved = read_config(given["out"])
        fixed = sorted(k for k in given if k in fields and k not in RESUMABLE and given[k] != saved.get(k))
        if fixed or options:
            raise InputError(f"--resume continues the saved configuration; cannot change {', '.join(fixed or options)}")
        cfg = Config.from_dict({**saved, **{k: v for k, v in given.items() if k in fields}})
    else:
        cfg = Config(**{k: v for k, v in given.items() if k in fields})
        cfg.estimator_options = {"num_samples": 1, **options}
        if "out" not in given:
            name = Path(cfg.dataset).stem if cfg.dataset.endswith((".npy", ".npz")) else cfg.dataset
            cfg.out = f"runs/{name}-{cfg.arch}-{cfg.latent}{cfg.latent_dim}-{cfg.estimator}-s{cfg.seed}"
    train(cfg, resume=resume, progress=not quiet)
    print(cfg.out)


def _add_reconstruct(sub):
    p = sub.add_parser("reconstruct", help="PNG of test images above their reconstructions (paper Fig. 4)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=16, help="test images per row (default 16)")
    p.add_argument("--rows", type=int, default=2, help="pairs of rows (default 2)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/reconstructions.png)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> None:
    from .figures import reconstructions, save_grid

    if args.n < 1 or args.rows < 1:
        raise InputError("--n and --rows must be at least 1")
    cfg, model, data = load_run(args.run_dir)
    torch.manual_seed(args.seed)
    x = data.x_test[: args.n * args.rows]
    x_hat = reconstructions(model, x)
    rows = [t for i in range(args.rows) for t in (x[i * args.n:(i + 1) * args.n], x_hat[i * args.n:(i + 1) * args.n])]
    out = args.out or str(Path(args.run_dir) / "reconstructions.png")
    save_grid(out, rows)
    print(out)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="discvae", description="Variational autoencoders with discrete latent variables.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_reconstruct):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"discvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("discvae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
