"""Self-check of the paths no test runs on a CPU-only machine -- CUDA, nccl, bf16 on a GPU -- each against the CPU.

    python benchmarks/gpu_check.py                 # on a machine with CUDA (about a minute; nccl needs 2 GPUs)
    python benchmarks/gpu_check.py --device cpu    # the same checks on the CPU against itself (gloo): a dry run

Without CUDA it says so and exits 0. Otherwise each check prints PASS or FAIL with what it measured and its
tolerance, and the exit status is 1 if any failed. The run is the digits model (8 x 8 images, 10-class categorical
latent) trained with the deterministic ``exact`` estimator on grey data, so the device changes only the rounding:

1. train: 2 epochs on DEVICE and on the CPU; parameters (mean |difference|) and metrics.csv (relative).
2. resume: 1 epoch then ``--resume`` to 2 on DEVICE equals 2 epochs straight, bit for bit.
3. bf16: the -ELBO of a 512-image batch under bf16 on DEVICE against fp32 on the CPU, relative (the tolerance of
   tests/test_speed.py and the README), and the networks' hidden layers run in bf16.
4. nccl: ``torchrun --nproc-per-node 2`` on 2 devices against one process on DEVICE (skipped with one device).
5. evaluate: ``evaluate`` of the trained model on DEVICE against the CPU: ln p(x) by enumeration, relative.
6. learning estimator: ``rodeo`` (lazy control network, coefficients, their own Adam) trains 1 epoch on DEVICE and,
   resumed to 2, equals 2 straight bit for bit; then the step time of ``disarm`` and ``rodeo`` on the 200-bit
   ``nonlinear`` model at batch 100 (the RODEO table's protocol), to size its 10^6-step runs on this device.

The tolerances are those of the CPU tests (tests/test_distributed.py, tests/test_speed.py) widened 10x for another
device's kernels; they have not yet been measured on a GPU (the first run on one should record its figures here).
TF32 is turned off so that float32 means float32.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from discvae import build_model, load_dataset, load_run
from discvae.cli import main as cli
from discvae.evaluation import evaluate
from discvae.training import elbo_terms

FLAGS = ["--dataset", "digits", "--latent", "categorical", "--latent-dim", "10", "--estimator", "exact",
         "--batch-size", "256", "--grad-var-every", "0", "--quiet"]
PARAMS_TOL = 1e-5   # mean |difference| of the parameters after 12 Adam steps (CPU tests: 1e-6)
METRICS_RTOL = 1e-3  # metrics.csv, relative (CPU tests: 1e-4)
BF16_RTOL = 1e-3     # tests/test_speed.py's tolerance for a batch's -ELBO
EVAL_RTOL = 1e-5     # exact ln p(x), relative
failures: list[str] = []


def check(name: str, ok: bool, measured: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {measured}", flush=True)
    if not ok:
        failures.append(name)


def train(out: Path, device: str, *flags: str) -> Path:
    assert cli(["train", *FLAGS, "--device", device, "--out", str(out), *flags]) == 0, out
    return out


def params(run: Path) -> torch.Tensor:
    state = torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")["model"]
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def metrics_rel(a: Path, b: Path) -> float:
    """The largest relative difference of metrics.csv's values (but the wall time) between runs ``a`` and ``b``."""
    rows = [list(csv.DictReader((run / "metrics.csv").open())) for run in (a, b)]
    assert len(rows[0]) == len(rows[1]) > 0
    return max(abs(float(x[k]) - float(y[k])) / max(abs(float(y[k])), 1e-12)
               for x, y in zip(*rows, strict=True) for k in x if k != "time")


def check_train_and_resume(tmp: Path, device: str) -> Path:
    here, cpu = train(tmp / "device", device, "--epochs", "2"), train(tmp / "cpu", "cpu", "--epochs", "2")
    diff = (params(here) - params(cpu)).abs().mean().item()
    check("train: parameters vs CPU", diff < PARAMS_TOL, f"mean |diff| {diff:.2e} (tolerance {PARAMS_TOL:g})")
    rel = metrics_rel(here, cpu)
    check("train: metrics.csv vs CPU", rel < METRICS_RTOL, f"max relative diff {rel:.2e} (tolerance {METRICS_RTOL:g})")
    parts = train(tmp / "parts", device, "--epochs", "1")
    assert cli(["train", "--resume", "--out", str(parts), "--epochs", "2", "--quiet"]) == 0
    check("resume: bit for bit", torch.equal(params(parts), params(here)),
          f"max |diff| {(params(parts) - params(here)).abs().max().item():.2e} (tolerance 0)")
    return here


def check_bf16(device: str) -> None:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        print(f"SKIP  bf16: {torch.cuda.get_device_name(dev)} has no native bf16")
        return
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), "bernoulli", 50, init="he")
    x = (torch.rand(512, 1, 28, 28) < 0.3).float()
    torch.manual_seed(7)
    fp32 = elbo_terms(model, x, 512)["neg_elbo"]
    model, x = model.to(dev), x.to(dev)
    dtypes = set()
    handle = model.decoder[0].register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    torch.manual_seed(7)
    bf16 = elbo_terms(model, x, 512, precision="bf16")["neg_elbo"]
    handle.remove()
    rel = abs(bf16 - fp32) / abs(fp32)
    check("bf16: batch -ELBO vs fp32 on the CPU", rel < BF16_RTOL and dtypes == {torch.bfloat16},
          f"relative diff {rel:.2e} (tolerance {BF16_RTOL:g}), decoder's first layer in {sorted(map(str, dtypes))}")


def check_two_ranks(tmp: Path, device: str, one: Path) -> None:
    if device != "cpu" and torch.cuda.device_count() < 2:
        print("SKIP  nccl: needs 2 CUDA devices")
        return
    out = tmp / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "discvae", "train", *FLAGS, "--device", device, "--epochs", "2", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode:
        check("nccl: 2 ranks", False, result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
        return
    diff = (params(out) - params(one)).abs().mean().item()
    check("2 ranks: parameters vs 1 process", diff < PARAMS_TOL, f"mean |diff| {diff:.2e} (tolerance {PARAMS_TOL:g})")
    rel = metrics_rel(out, one)
    check("2 ranks: metrics.csv vs 1 process", rel < METRICS_RTOL,
          f"max relative diff {rel:.2e} (tolerance {METRICS_RTOL:g})")


def check_evaluate(run: Path, device: str) -> None:
    _, model, data = load_run(run)
    x = data.x_test[:200]
    out = {}
    for dev in ("cpu", device):
        torch.manual_seed(0)
        out[dev] = evaluate(model.to(dev).eval(), x.to(dev), k=10)["exact_log_px"]
    rel = abs(out[device] - out["cpu"]) / abs(out["cpu"])
    check("evaluate: exact ln p(x) vs CPU", rel < EVAL_RTOL, f"relative diff {rel:.2e} (tolerance {EVAL_RTOL:g})")


def check_learning_estimator(tmp: Path, device: str) -> None:
    flags = ["--latent", "bernoulli", "--latent-dim", "8", "--estimator", "rodeo", "--num-samples", "2"]
    straight = train(tmp / "rodeo", device, "--epochs", "2", *flags)
    parts = train(tmp / "rodeo-parts", device, "--epochs", "1", *flags)
    assert cli(["train", "--resume", "--out", str(parts), "--epochs", "2", "--quiet"]) == 0
    states = [torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")["estimator"]["state"]
              for run in (straight, parts)]
    same = torch.equal(params(parts), params(straight)) and all(torch.equal(states[0][k], states[1][k])
                                                                for k in states[0])
    check("rodeo: resume bit for bit, estimator state too", same, f"alpha {states[0]['alpha'].item():.3g}")
    from discvae import make_estimator
    model = build_model("nonlinear", (784,), "bernoulli", 200, slope=0.3).to(device)
    x = (torch.rand(100, 784, device=device) < 0.3).float()
    for name in ("disarm", "rodeo"):
        est = make_estimator(name, num_samples=2).to(device)
        model(x[:2], est)
        opt = torch.optim.Adam([*model.parameters(), *est.parameters()], lr=1e-3)

        def step(opt=opt, est=est):
            opt.zero_grad(set_to_none=True)
            model(x, est).loss.backward()
            opt.step()
        for _ in range(20):
            step()
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(200):
            step()
        if device != "cpu":
            torch.cuda.synchronize()
        print(f"TIME  {name}: {(time.perf_counter() - start) / 200 * 1e3:.2f} ms a step (nonlinear, 200 bits, "
              "batch 100, M = 2)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    device = parser.parse_args(argv).device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU paths are covered by the test suite)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    load_dataset("digits")  # embedded: no download
    with tempfile.TemporaryDirectory() as tmp:
        run = check_train_and_resume(Path(tmp), device)
        check_bf16(device)
        check_two_ranks(Path(tmp), device, run)
        check_evaluate(run, device)
        check_learning_estimator(Path(tmp), device)
    print(f"{len(failures)} failed: {', '.join(failures)}" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
