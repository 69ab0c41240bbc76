"""The ``discvae`` command: ``train``, ``reconstruct``, ``evaluate``, ``plot``, ``reproduce``, ``compare``.

Bad input (and a file-system error) ends with one line on stderr and exit status 2; Ctrl-C with exit status 130.
Library errors name parameters as Python spells them (``num_samples``); :func:`main` shows them as flags
(``--num-samples``), here and nowhere else.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import torch

from . import distributed
from .callbacks import TensorBoard
from .data import DATASETS
from .distributions import DEFAULT_SIZE, FAMILIES
from .errors import InputError
from .estimators import BASELINES, ESTIMATORS
from .likelihoods import BINARIZE, LIKELIHOODS
from .models import ARCHS, INITS
from .runs import CONFIG, check_output, read_config
from .speed import PRECISIONS
from .training import RESUMABLE, Config, load_run, train


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# CLI flag -> key of Config.estimator_options; each estimator function takes these keywords.
ESTIMATOR_FLAGS = {"num_samples": "num_samples", "proposal": "proposal", "baseline": "baseline", "tau": "tau"}
# CLI flag -> key of Config.estimator_schedule: [start, end, rate] of an annealed option
SCHEDULE_FLAGS = {"tau_anneal": "tau"}


def _capacity(text: str) -> tuple[str, list]:
    """``BLOCK=CMAX:STEPS`` -> (block, [CMAX, STEPS])."""
    name, _, rest = text.partition("=")
    c_max, _, steps = rest.partition(":")
    try:
        return name, [float(c_max), int(steps)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCK=CMAX:STEPS, e.g. categorical=2.3:25000") from None


def _add_train(sub):
    d = Config()
    p = sub.add_parser("train", help="train a VAE", description="Train a VAE; defaults are the paper's MNIST "
                       "settings (Adam, lr 1e-3, batch 2048, 300 epochs).", argument_default=argparse.SUPPRESS)
    p.add_argument("--dataset", help=f"{', '.join(DATASETS)} or a .npy/.npz file (default {d.dataset})")
    p.add_argument("--data-dir", help="folder holding mnist/ and fashion-mnist/ (default $DISCVAE_DATA, "
                   "else ~/.cache/discvae)")
    p.add_argument("--download", action="store_true", help="fetch missing MNIST/Fashion-MNIST files")
    p.add_argument("--arch", choices=ARCHS, help=f"Table I architecture (default {d.arch})")
    p.add_argument("--init", choices=INITS, help="weight initialisation: torch (PyTorch's default) or he "
                   "(N(0, 2/fan_in), zero biases) (default torch)")
    p.add_argument("--latent", help=f"latent family: {', '.join(FAMILIES)} (sized by --latent-dim and --groups), or "
                   "blocks with their sizes joined by +, e.g. categorical:10+gaussian:10, bernoulli:32+gaussian:8, "
                   f"categorical:10x20 (20 groups) (default {d.latent})")
    p.add_argument("--latent-dim", type=int, help=f"bits, classes per group, or Gaussian dims (default {DEFAULT_SIZE})")
    p.add_argument("--groups", type=int, help="independent categorical groups (default 1)")
    p.add_argument("--capacity", action="append", metavar="BLOCK=CMAX:STEPS", type=_capacity,
                   help="a capacity for a block of the latent (JointVAE): its KL term becomes gamma |KL - C(t)|, C "
                   "rising linearly from 0 to CMAX nats over STEPS steps; repeat for several blocks")
    p.add_argument("--capacity-gamma", type=float, help=f"gamma of --capacity (default {d.capacity_gamma})")
    p.add_argument("--likelihood", choices=list(LIKELIHOODS), help=f"p(x|z) (default {d.likelihood})")
    p.add_argument("--binarize", choices=BINARIZE, help=f"data binarisation (default {d.binarize})")
    p.add_argument("--estimator", choices=list(ESTIMATORS), help=f"gradient estimator (default {d.estimator})")
    p.add_argument("--num-samples", type=int, help="samples of z per data point, M (default 1)")
    p.add_argument("--proposal", choices=("posterior", "uniform"),
                   help="importance proposal q_I: xi = eta (default, eq. 23/29) or uniform (xi = 0)")
    p.add_argument("--baseline", choices=BASELINES, help="control variate of the importance estimator: none "
                   "(default, the paper), mean (over the rest of the batch) or loo (over the other M-1 samples)")
    p.add_argument("--tau", type=float, help="temperature of gumbel / st-gumbel (default 1)")
    p.add_argument("--tau-anneal", type=float, nargs=3, metavar=("START", "END", "RATE"),
                   help="anneal tau as max(END, START exp(-RATE step)) (Jang et al. 2017); overrides --tau")
    p.add_argument("--epochs", type=int, help=f"(default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, help=f"fixes every random number (default {d.seed})")
    p.add_argument("--grad-var-every", type=int, help="record gradient variance every N epochs (default 1, 0: never)")
    p.add_argument("--grad-var-repeats", type=int, help="independent gradient estimates R for it (default 16)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default) or bf16: the networks under autocast in "
                   "bfloat16, weights, optimizer state and log-space sums in fp32; needs a GPU with bf16 or a CPU "
                   "with AVX512-BF16 or AMX")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (falls back to eager, "
                   "with a warning, where no compiler works)")
    p.add_argument("--out", help="run directory (default runs/DATASET-ARCH-LATENT-ESTIMATOR-sSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="also log every metric of each epoch for TensorBoard into "
                   "DIR (needs the tensorboard package; not part of the run: a resumed run may log or not)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    given = vars(args)
    resume = given.pop("resume", False)
    quiet = given.pop("quiet", False)
    callbacks = [TensorBoard(given.pop("tensorboard"), "--tensorboard")] if "tensorboard" in given else []
    options = {ESTIMATOR_FLAGS[k]: given.pop(k) for k in list(given) if k in ESTIMATOR_FLAGS}
    schedule = {SCHEDULE_FLAGS[k]: given.pop(k) for k in list(given) if k in SCHEDULE_FLAGS}
    if "capacity" in given:
        given["capacity"] = dict(given["capacity"])
    fields = {f.name for f in dataclasses.fields(Config)}
    if resume:
        if "out" not in given:
            raise InputError("--resume needs --out RUN_DIR")
        saved = read_config(given["out"])
        fixed = sorted(k for k in given if k in fields and k not in RESUMABLE and given[k] != saved.get(k))
        if fixed or options or schedule:
            raise InputError("--resume continues the saved configuration; cannot change "
                             f"{', '.join(fixed or [*options, *schedule])}")
        cfg = Config.from_dict({**saved, **{k: v for k, v in given.items() if k in fields}},
                               f"{Path(given['out']) / CONFIG}")
    else:
        cfg = Config(**{k: v for k, v in given.items() if k in fields})
        cfg.estimator_options = {"num_samples": 1, **options}
        cfg.estimator_schedule = schedule
        if "out" not in given:
            name = Path(cfg.dataset).stem if cfg.dataset.endswith((".npy", ".npz")) else cfg.dataset
            latent = str(cfg.space).replace(":", "").replace("+", "-")
            cfg.out = f"runs/{name}-{cfg.arch}-{latent}-{cfg.estimator}-s{cfg.seed}"
    train(cfg, resume=resume, progress=not quiet, callbacks=callbacks)
    if distributed.rank() == 0:  # under torchrun, once
        print(cfg.out)


def _add_reconstruct(sub):
    p = sub.add_parser("reconstruct", help="PNG of test images above their reconstructions (paper Fig. 4)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=16, help="test images per row (default 16)")
    p.add_argument("--rows", type=int, default=2, help="pairs of rows (default 2)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/reconstructions.png)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples of z (default 0)")
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> None:
    from .figures import reconstructions, save_grid

    if args.n < 1 or args.rows < 1:
        raise InputError("--n and --rows must be at least 1")
    cfg, model, data = load_run(args.run_dir)
    out = check_output(args.out or Path(args.run_dir) / "reconstructions.png", "file")
    torch.manual_seed(args.seed)
    x = data.x_test[: args.n * args.rows]
    x_hat = reconstructions(model, x)
    rows = [t for i in range(args.rows) for t in (x[i * args.n:(i + 1) * args.n], x_hat[i * args.n:(i + 1) * args.n])]
    save_grid(out, rows)
    print(out)


def _add_evaluate(sub):
    p = sub.add_parser("evaluate", help="test-set -ELBO, IWAE bound, exact ln p(x), latent usage -> eval.json",
                       description="Evaluate a run on its test set (and with --train-set its training set): "
                       "negative ELBO and its terms, the K-sample IWAE bound on ln p(x), the exact ln p(x) when the "
                       "latent has few enough states, and latent usage. Prints a table and writes RUN_DIR/eval.json.")
    p.add_argument("run_dir")
    p.add_argument("--k", type=int, default=1000, help="importance samples of the IWAE bound (default 1000)")
    p.add_argument("--chunk", type=int, default=100, help="samples drawn at a time (default 100)")
    p.add_argument("--batch-size", type=int, default=500, help="images at a time (default 500)")
    p.add_argument("--train-set", action="store_true", help="also evaluate the training set")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and a dynamic binarisation (default 0)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default) or bf16 (the networks "
                   "under autocast, the log-space sums in fp32)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> None:
    from .evaluation import EVAL, evaluate_run

    result = evaluate_run(args.run_dir, args.k, args.chunk, args.batch_size, args.train_set, args.seed,
                          args.precision)
    splits = [s for s in ("test", "train") if s in result]
    keys = [k for k in result["test"] if k != "seconds"] + ["seconds"]
    print(f"{'':28s}" + "".join(f"{s:>14s}" for s in splits))
    for key in keys:
        label = f"iwae (K={result['k']})" if key == "iwae" else key
        print(f"{label:28s}" + "".join(f"{result[s][key]:14.4f}" if isinstance(result[s][key], float)
                                       else f"{result[s][key]:14d}" for s in splits))
    print(Path(args.run_dir) / EVAL)


def _add_plot(sub):
    p = sub.add_parser("plot", help="convergence curves and image grids of one or more runs (paper Fig. 4-7)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="folder for the PNGs (default the first RUN_DIR)")
    p.add_argument("--n", type=int, default=16, help="images per row (default 16)")
    p.add_argument("--rows", type=int, default=2, help="rows of reconstructions and samples (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples and a dynamic binarisation (default 0)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> None:
    from .figures import plot_runs

    for path in plot_runs(args.run_dirs, args.out, args.n, args.rows, args.seed):
        print(path)


def _add_reproduce(sub):
    from .reproduce import GRID

    p = sub.add_parser("reproduce", help="train, evaluate and plot the paper's experiment grid -> report.md",
                       description="Train (or resume) the paper's models in OUT/NAME with its settings, evaluate "
                       "them, plot them and write OUT/report.md. Models: " + ", ".join(GRID) + ".")
    p.add_argument("--out", required=True, help="folder of the runs and the report")
    p.add_argument("--only", help="comma-separated subset of the models")
    p.add_argument("--epochs", type=int, default=300, help="train each run to at least this many epochs (default "
                   "300, the paper's)")
    p.add_argument("--dataset", choices=("digits",), help="run every model on the embedded 8x8 digits (quick)")
    p.add_argument("--data-dir", help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--k", type=int, default=1000, help="IWAE samples (default 1000)")
    p.add_argument("--chunk", type=int, default=100, help="IWAE samples drawn at a time (default 100)")
    p.add_argument("--grad-var-every", type=int, default=5, help="record gradient variance every N epochs "
                   "(default 5)")
    p.add_argument("--reevaluate", action="store_true", help="evaluate again even if eval.json is current")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> None:
    from .reproduce import reproduce

    if args.epochs < 1:
        raise InputError("--epochs must be at least 1")
    flags = {"only": args.only, "epochs": args.epochs, "dataset": args.dataset, "data-dir": args.data_dir,
             "k": args.k, "chunk": args.chunk, "grad-var-every": args.grad_var_every}
    command = shlex.join(["discvae", "reproduce", "--out", args.out] + [
        t for key, v in flags.items() if v is not None for t in (f"--{key}", str(v))])
    print(reproduce(args.out, args.only, args.epochs, args.dataset, args.data_dir, args.k, args.chunk,
                    args.grad_var_every, args.reevaluate, not args.quiet, command))


def _add_compare(sub):
    d = Config()
    p = sub.add_parser("compare", help="several estimators side by side: bias, variance, training curves",
                       description="Run several gradient estimators on the same model, data, seed and budget "
                       "(M decoder evaluations per data point and step) and write report.md, bias_variance.png, "
                       "curves.png and results.json into --out. Restarting with the same arguments resumes.")
    p.add_argument("estimators", nargs="+", metavar="ESTIMATOR",
                   help="NAME or NAME:key=value:... (e.g. importance:num_samples=1, gumbel:tau=0.5)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--dataset", default="digits", help=f"{', '.join(DATASETS)} or a .npy/.npz file (default digits)")
    p.add_argument("--data-dir", help="folder holding mnist/ and fashion-mnist/")
    p.add_argument("--arch", choices=ARCHS, default=d.arch, help=f"Table I architecture (default {d.arch})")
    p.add_argument("--init", choices=INITS, default=d.init, help="weight initialisation (default torch)")
    p.add_argument("--latent", choices=("bernoulli", "categorical"), default=d.latent,
                   help=f"latent family (default {d.latent})")
    p.add_argument("--latent-dim", type=int, default=d.latent_dim,
                   help=f"bits or classes per group (default {d.latent_dim})")
    p.add_argument("--groups", type=int, default=1, help="independent categorical groups (default 1)")
    p.add_argument("--binarize", choices=BINARIZE, default=d.binarize, help=f"data binarisation (default {d.binarize})")
    p.add_argument("--num-samples", type=int, default=2, help="decoder evaluations per data point M (default 2)")
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs per estimator (default 10; 0: bias and variance only)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--seed", type=int, default=0, help="fixes every random number (default 0)")
    p.add_argument("--eval-every", type=int, default=5, help="epochs between test IWAE bounds (default 5)")
    p.add_argument("--iwae-k", type=int, default=100, help="samples of the bound during training (default 100)")
    p.add_argument("--iwae-n", type=int, default=1000, help="test points for it (default 1000)")
    p.add_argument("--final-k", type=int, default=1000, help="samples of the final bound (default 1000)")
    p.add_argument("--final-n", type=int, default=10000, help="test points for it (default 10000)")
    p.add_argument("--grad-var-every", type=int, default=5, help="epochs between gradient variances (default 5)")
    p.add_argument("--grad-var-repeats", type=int, default=16, help="independent gradient estimates for it "
                   "(default 16)")
    p.add_argument("--bias-latent-dim", type=int, default=10,
                   help="bits/classes of the enumerable bias model when the run's latent is too large (default 10)")
    p.add_argument("--bias-epochs", type=int, default=1, help="epochs of exact training of it (default 1)")
    p.add_argument("--bias-batch", type=int, default=100, help="training points of the fixed batch (default 100)")
    p.add_argument("--bias-repeats", type=int, default=200, help="independent estimates R (default 200)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    from .compare import compare, parse_spec

    specs = [parse_spec(s, args.num_samples) for s in args.estimators]
    check_output(args.out)
    base = Config(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch, init=args.init,
                  latent=args.latent, latent_dim=args.latent_dim, groups=args.groups, binarize=args.binarize,
                  epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                  grad_var_every=args.grad_var_every, grad_var_repeats=args.grad_var_repeats, device=args.device,
                  out=args.out)
    compare(base, specs, args.out, args.eval_every, args.iwae_k, args.iwae_n, args.final_k, args.final_n,
            args.bias_latent_dim, args.bias_epochs, args.bias_batch, args.bias_repeats, progress=not args.quiet)
    print(Path(args.out) / "report.md")


def _add_encode(sub):
    from .codes import SPLITS

    p = sub.add_parser("encode", help="a run's deterministic codes and posterior probabilities -> .npz",
                       description="Encode the images of a split with a trained run and write an .npz: codes (bits "
                       "[q(z_i=1|x) > 1/2], a categorical's most probable class per group, or Gaussian means; one row "
                       "per image), probs (posterior probabilities or means), labels, packed (np.packbits of the "
                       "bits, Bernoulli runs) and latent, latent_dim, groups, split.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--out", required=True, help=".npz file to write (atomically)")
    p.add_argument("--split", choices=SPLITS, default="all", help="images to encode: train, test or all (train "
                   "then test; default all)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per encoder call (default 1024)")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args) -> None:
    from .codes import encode_run

    out = check_output(args.out, "file")
    arrays = encode_run(args.run_dir, out, args.split, args.batch_size)
    print(f"{out}: {len(arrays['codes'])} codes")


def _add_retrieval(sub):
    p = sub.add_parser("retrieval", help="hashing evaluation of Bernoulli runs' codes against LSH, PCAH, ITQ",
                       description="Rank the training images by the Hamming distance of their codes to test queries "
                       "(100 per class) and report mAP, precision at 500 and 1000, precision within radius "
                       "2 and the precision-recall curve of every run and of the lsh, pcah and itq baselines at the "
                       "same code length; writes retrieval.json, pr_curves.png, query_grid.png and report.md.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="trained runs with Bernoulli latents, one dataset")
    p.add_argument("--out", required=True, help="folder for the results and the report")
    p.add_argument("--seed", type=int, default=0, help="seeds the queries and the lsh / itq baselines (default 0)")
    p.add_argument("--per-class", type=int, default=100, help="queries per class (default 100)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per encoder call (default 1024)")
    p.set_defaults(func=cmd_retrieval)


def cmd_retrieval(args) -> None:
    from .retrieval import retrieval

    print(retrieval(args.run_dirs, check_output(args.out), args.seed, args.per_class, args.batch_size))


def _add_clustering(sub):
    p = sub.add_parser("clustering", help="clustering evaluation of one-group categorical runs against k-means",
                       description="Cluster all training and test images by argmax_k q(z=k|x) and report the "
                       "accuracy (one-to-one matching when there are as many clusters as classes, and many-to-one), "
                       "NMI and ARI of every run (mean and std over runs differing only by seed) and of k-means on "
                       "the pixels, on PCA-50 and on a Gaussian VAE's means; writes clustering.json, confusion.png, "
                       "clusters.png and report.md.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="trained runs with one categorical group, one dataset")
    p.add_argument("--out", required=True, help="folder for the results and the report")
    p.add_argument("--gaussian", metavar="RUN_DIR", help="a Gaussian VAE run: k-means on its posterior means too")
    p.add_argument("--seed", type=int, default=0, help="seeds k-means and PCA (default 0)")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts, the best kept (default 1: on the 70,000 "
                   "MNIST pixels one k = 10 fit takes seconds, one k = 100 fit about a minute)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per encoder call (default 1024)")
    p.set_defaults(func=cmd_clustering)


def cmd_clustering(args) -> None:
    from .clustering import clustering

    print(clustering(args.run_dirs, check_output(args.out), args.gaussian, args.seed, args.n_init, args.batch_size))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="discvae", description="Variational autoencoders with discrete latent variables.")
    parser.add_argument("--version", action="version", version=f"discvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_reconstruct, _add_evaluate, _add_plot, _add_reproduce, _add_compare,
                _add_encode, _add_retrieval, _add_clustering):
        add(sub)
    return parser


def flag(param: str) -> str:
    """The command-line flag of a library parameter: ``num_samples`` -> ``--num-samples``."""
    return "--" + param.replace("_", "-")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except InputError as err:
        print(f"discvae {args.command}: error: {err.renamed(flag)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"discvae {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("discvae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
