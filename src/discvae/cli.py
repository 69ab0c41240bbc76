"""The ``discvae`` command: ``train``, ``reconstruct``, ``evaluate``, ``plot``, ``reproduce``, ``compare``, ``encode``,
``index``, ``search``, ``retrieval``, ``clustering``.

Bad input (and a file-system error) ends with one line on stderr and exit status 2; Ctrl-C with exit status 130.
Library errors name parameters as Python spells them (``num_samples``); :func:`main` shows them as flags
(``--num-samples``), here and nowhere else.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch

from . import distributed
from .callbacks import TensorBoard
from .config import RESUMABLE, Config, check_seed
from .errors import InputError
from .flags import add_flags, build, changed, flag, given
from .latents import LatentSpace
from .models import ARCH_OPTIONS
from .presets import PRESETS, preset
from .runs import CONFIG, check_output, read_config, read_settings, write_text
from .speed import PRECISIONS
from .training import load_run, train


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Exit with status 2 and the usage error on one line, printed by rank 0 alone under torchrun."""
        self.exit(2, f"{self.prog}: error: {message}\n" if distributed.rank() == 0 else None)


def _add_train(sub):
    p = sub.add_parser("train", help="train a VAE", description="Train a VAE; defaults are the paper's MNIST "
                       "settings (Adam, lr 1e-3, batch 2048, 300 epochs).")
    add_flags(p, Config)
    recipe = p.add_mutually_exclusive_group()
    recipe.add_argument("--preset", choices=PRESETS, help="start from a named recipe shipped with discvae "
                        "(hashing: 16-bit codes for search; clustering: 10 clusters beside a Gaussian); the flags "
                        "given override its settings")
    recipe.add_argument("--config", metavar="FILE", help="start from the settings in FILE (JSON, the format of a "
                        "run's config.json; those left out keep their defaults); the flags given override them")
    p.add_argument("--print-config", action="store_true", help="print the whole configuration as JSON and exit "
                   "without training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", metavar="DIR", help="also log every metric of each epoch for TensorBoard into "
                   "DIR (needs the tensorboard package; not part of the run: a resumed run may log or not)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> None:
    settings = given(args, Config)
    callbacks = [TensorBoard(args.tensorboard, "--tensorboard")] if args.tensorboard else []
    if args.resume:
        if "out" not in settings:
            raise InputError("--resume needs --out RUN_DIR")
        if args.preset or args.config:
            raise InputError("--resume continues the run's own configuration; drop --preset and --config")
        saved = Config.from_dict(read_config(settings["out"]), f"{Path(settings['out']) / CONFIG}")
        fixed = changed(args, saved, skip=RESUMABLE)
        if fixed:
            raise InputError(f"--resume continues the saved configuration; cannot change {', '.join(fixed)}")
        cfg = dataclasses.replace(saved, **{k: v for k, v in settings.items() if k in RESUMABLE})
    else:
        values = starting_point(args, settings)
        cfg = build(Config, values)
        if "out" not in values:
            name = Path(cfg.dataset).stem if cfg.dataset.endswith((".npy", ".npz")) else cfg.dataset
            latent = str(cfg.space).replace(":", "").replace("+", "-")
            cfg.out = f"runs/{name}-{cfg.arch}-{latent}-{cfg.estimator}-s{cfg.seed}"
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg.check()), indent=2))
        return
    train(cfg, resume=args.resume, progress=not args.quiet, callbacks=callbacks)
    if distributed.rank() == 0:  # under torchrun, once
        print(cfg.out)


def starting_point(args, settings: dict) -> dict:
    """The settings of ``--preset`` or ``--config`` (if either was given) with the flags given, ``settings``, over
    them; a dict setting (``estimator_options``, ``augment``) takes the flags' keys over the file's, and a latent
    given with its own sizes (``--latent bernoulli:16+gaussian:16``) drops the file's ``latent_dim`` and ``groups``, and
    another ``--arch`` drops the file's options of its architecture (``hidden``, ``slope``)."""
    base = preset(args.preset) if args.preset else read_settings(args.config) if args.config else {}
    if base:
        Config.from_dict(base, args.config or f"preset {args.preset}")  # its names and types, checked
    dropped = set()  # the file's settings that the flags given make meaningless
    if isinstance(settings.get("latent"), str) and LatentSpace.sizes_itself(settings["latent"]):
        dropped |= {"latent_dim", "groups"}
    if settings.get("arch", base.get("arch", Config.arch)) != base.get("arch", Config.arch):
        dropped |= set(ARCH_OPTIONS)
    base = {name: value for name, value in base.items() if name not in dropped}
    return {**base, **{name: {**base[name], **value} if isinstance(value, dict) and isinstance(base.get(name), dict)
                       else value for name, value in settings.items()}}


def _add_reconstruct(sub):
    p = sub.add_parser("reconstruct", help="PNG of test images above their reconstructions (paper Fig. 4)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=16, help="test images per row (default 16)")
    p.add_argument("--rows", type=int, default=2, help="pairs of rows (default 2)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/reconstructions.png)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples of z (default 0)")
    p.set_defaults(func=cmd_reconstruct)


def cmd_reconstruct(args) -> None:
    from .figures import check_grid, reconstructions, save_grid

    if args.n < 1 or args.rows < 1:
        raise InputError("--n and --rows must be at least 1")
    check_seed(args.seed)
    read_config(args.run_dir)  # a run directory: said before anything about the output
    out = check_output(args.out or Path(args.run_dir) / "reconstructions.png", "file")
    cfg, model, data = load_run(args.run_dir)
    check_grid(args.rows, args.n, data.x_test.shape[1:])
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
    from .experiments.reproduce import FIXED, GRID, Reproduction

    p = sub.add_parser("reproduce", help="train, evaluate and plot the paper's experiment grid -> report.md",
                       description="Train (or resume) the paper's models in OUT/NAME with its settings, evaluate "
                       "them, plot them and write OUT/report.md. Models: " + ", ".join(GRID) + ".")
    add_flags(p, Reproduction)
    add_flags(p, Config, skip=FIXED, defaults={"grad_var_every": 5})
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> None:
    from .experiments.reproduce import Reproduction, reproduce

    print(reproduce(build(Config, given(args, Config)), build(Reproduction, given(args, Reproduction)),
                    progress=not args.quiet, command=shlex.join(["discvae", *args.argv])))


def _add_compare(sub):
    from .experiments.compare import BASE_DEFAULTS, NOT_FLAGS, Comparison

    p = sub.add_parser("compare", help="several estimators side by side: bias, variance, training curves",
                       description="Run several gradient estimators on the same model, data, seed and budget "
                       "(M decoder evaluations per data point and step) and write report.md, bias_variance.png, "
                       "curves.png and results.json into --out; --epochs 0 measures bias and variance only. "
                       "Restarting with the same arguments resumes.")
    p.add_argument("estimators", nargs="+", metavar="ESTIMATOR",
                   help="NAME or NAME:key=value:... (e.g. importance:num_samples=1, gumbel:tau=0.5)")
    add_flags(p, Comparison)
    add_flags(p, Config, skip=NOT_FLAGS, defaults=BASE_DEFAULTS)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> None:
    from .experiments.compare import Comparison, compare, parse_spec

    base, settings = given(args, Config), build(Comparison, given(args, Comparison))
    if "seed" in base and settings.seeds:
        raise InputError("give --seed or --seeds, not both")
    base = build(Config, base)
    specs = [parse_spec(s, base.estimator_options["num_samples"]) for s in args.estimators]
    check_output(settings.out)
    compare(base, specs, settings, progress=not args.quiet)
    print(Path(settings.out) / "report.md")


def _add_encode(sub):
    from .applications.codes import SPLITS

    p = sub.add_parser("encode", help="a run's deterministic codes and posterior probabilities -> .npz",
                       description="Encode the images of a split with a trained run and write an .npz: codes (bits "
                       "[q(z_i=1|x) > 1/2], a categorical's most probable class per group, or Gaussian means; one row "
                       "per image), probs (posterior probabilities or means), labels, packed (np.packbits of the "
                       "bits, Bernoulli runs) and latent, latent_dim, groups, split. Under torchrun the ranks share "
                       "the images and rank 0 writes.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    p.add_argument("--out", required=True, help=".npz file to write (atomically)")
    p.add_argument("--split", choices=SPLITS, default="all", help="images to encode: train, test or all (train "
                   "then test; default all)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per encoder call (default 1024)")
    p.set_defaults(func=cmd_encode)


def cmd_encode(args) -> None:
    from .applications.codes import encode_run

    out = check_output(args.out, "file")
    arrays = encode_run(args.run_dir, out, args.split, args.batch_size)
    if distributed.rank() == 0:  # under torchrun, once
        print(f"{out}: {len(arrays['codes'])} codes")


def _add_index(sub):
    p = sub.add_parser("index", help="a Bernoulli run's codes of a collection of images -> a faiss binary index",
                       description="Encode a collection of images with a trained Bernoulli run, batch by batch, into "
                       "the folder INDEX: codes.faiss (a faiss IndexBinaryFlat), ids.npy (the row of each code) and "
                       "index.json (digests of the run and of both files, so that search can check the index is the "
                       "run's and whole). INDEX is new, empty or an index to rebuild; it is replaced in one step. "
                       "Under torchrun the ranks share the rows and rank 0 writes.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run with a Bernoulli latent")
    p.add_argument("--data", required=True, help="the collection: NAME:SPLIT (mnist, fashion-mnist or digits; "
                   "train, test or all), FILE.npy or FILE.npz[:KEY] (both streamed), items of the run's "
                   "image shape or as many values")
    p.add_argument("--out", required=True, metavar="INDEX", help="folder to write the index into (new, empty, or "
                   "an index to rebuild)")
    _add_encoding_flags(p)
    p.set_defaults(func=cmd_index)


def _add_encoding_flags(p) -> None:
    p.add_argument("--data-dir", help="folder holding mnist/ and fashion-mnist/ (default: the run's)")
    p.add_argument("--batch-size", type=int, default=1024, help="images per encoder call (default 1024)")


def cmd_index(args) -> None:
    from .applications.search import build_index

    index = build_index(args.run_dir, args.data, args.out, args.batch_size, args.data_dir)
    if distributed.rank() == 0:  # under torchrun, once
        print(f"{args.out}: {index.index_.ntotal} codes of {index.bits_} bits")


def _add_search(sub):
    p = sub.add_parser("search", help="the k nearest items of query images in an index, by Hamming distance",
                       description="Encode query images with RUN_DIR and find the k nearest codes of INDEX (built by "
                       "discvae index with the same run, as it is now): one record (json) or k rows (csv) per query "
                       "with the ids of the items and their Hamming distances, nearest first.")
    p.add_argument("index", metavar="INDEX", help="an index folder written by discvae index")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run the index was built with")
    p.add_argument("--query", required=True, help="the query images, given as index's --data")
    p.add_argument("-k", "--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--format", default="json", help="json (default) or csv")
    p.add_argument("--out", help="file to write (atomically; default stdout)")
    _add_encoding_flags(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> None:
    from .applications.search import HashIndex, check_format, format_results

    check_format(args.format)
    out = args.out and check_output(args.out, "file")
    index = HashIndex.load(args.index, args.run_dir, args.batch_size, args.data_dir)
    text = format_results(*index.search(args.query, args.k), args.format)
    if out:
        print(write_text(out, text))
    else:
        sys.stdout.write(text)


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
    from .applications.retrieval import retrieval

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
    from .applications.clustering import clustering

    print(clustering(args.run_dirs, check_output(args.out), args.gaussian, args.seed, args.n_init, args.batch_size))


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="discvae", description="Variational autoencoders with discrete latent variables.")
    parser.add_argument("--version", action="version", version=f"discvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_reconstruct, _add_evaluate, _add_plot, _add_reproduce, _add_compare,
                _add_encode, _add_index, _add_search, _add_retrieval, _add_clustering):
        add(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (InputError, OSError) as err:
        if distributed.rank() == 0:  # under torchrun, once
            text = err.renamed(flag) if isinstance(err, InputError) else err
            print(f"discvae {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("discvae: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
