"""bf16 (``precision``), ``compile`` and the lean step's divergence guard.

bf16 tolerance: bfloat16 keeps an 8-bit significand (each rounded value is off by up to 2^-9 = 0.2% relative), and
the networks' rounding errors partly cancel over the 784 pixels summed in fp32. On a 512-image batch the bf16 -ELBO
was within 1.7e-4 (relative) of the fp32 one for every one of 24 models measured (fc, linear, nonlinear, cnn; torch
and He init; 3 seeds); the test allows 1e-3, 6x that (0.5 nat at 550 nats).

These run on every CPU: autocast computes in bf16 whether or not the hardware has native bf16 (only slower without
it), so correctness never depends on the machine; the refusal of slow bf16 is tested with the CPU's flags simulated.
"""
import json
from contextlib import contextmanager

import pytest
import torch
from test_train import params, read_metrics, small_digits
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from discvae import (
    Config,
    Diverged,
    build_model,
    distributions,
    likelihoods,
    make_estimator,
    models,
    speed,
    train,
    training,
)
from discvae.estimators import importance
from discvae.training import elbo_terms
from helpers import assert_one_line_error, assert_unbiased_with_power, replica_grads, run_cli, tiny_data, tiny_model

BF16_RTOL = 1e-3


@pytest.mark.parametrize("arch,init", [("fc", "he"), ("cnn", "torch")])
def test_the_bf16_loss_of_a_batch_is_within_tolerance_of_fp32(arch, init):
    torch.manual_seed(0)
    model = build_model(arch, (1, 28, 28), "bernoulli", 50, init=init)
    x = (torch.rand(512, 1, 28, 28) < 0.3).float()
    loss = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(7)  # the same samples of z
        loss[precision] = elbo_terms(model, x, 512, precision=precision)["neg_elbo"]
    assert loss["bf16"] != loss["fp32"]  # bf16 did run
    assert abs(loss["bf16"] - loss["fp32"]) < BF16_RTOL * abs(loss["fp32"]), loss


def test_under_bf16_the_networks_run_in_bf16_and_the_loss_gradients_and_state_stay_fp32():
    torch.manual_seed(0)
    model = build_model("fc", (1, 28, 28), "bernoulli", 12)
    x = (torch.rand(8, 1, 28, 28) < 0.3).float()
    with speed.autocast("bf16", x.device):
        assert model.encoder[:-1](x).dtype == model.decoder(torch.rand(8, 12)).dtype == torch.bfloat16
        assert model.encoder(x).dtype == torch.float32  # the head computing eta runs in fp32 (models.Head)
        terms = model(x, make_estimator("exact"))  # exact: 2^12 states share the batch through one matmul
    assert terms.loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in terms.values().values())
    optimizer = speed.adam(model.parameters(), 1e-3)
    terms.loss.backward()
    optimizer.step()
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for k, v in s.items() if k != "step")


def test_disarm_stays_unbiased_under_bf16():
    """DisARM's estimates under autocast against the exact gradient of the same bf16 computation (``exact`` through
    the same vectorised decoder, under autocast), with the power of the check stated and asserted as in
    test_unbiasedness.py: R = 20000 replicas, a relative bias of 10 % detected in the encoder's and the decoder's
    gradient, x0.9 / x1.1 / noise defects failing. bf16 changes f(z) = ln p(x|z), not the estimator's expectation.
    (The exact gradient of the same model evaluated in another batch layout, ``exact_grad``, differs by about 2 % of
    its largest entry: bf16 rounds differently there, and a check this strong sees it.)"""
    model, x = tiny_model("bernoulli", 3).float(), tiny_data().float()
    torch.manual_seed(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decode(torch.ones(1, 1, 3)).dtype == torch.float32
        grads = replica_grads(model, x, "disarm", 20000, num_samples=2)
        truth = replica_grads(model, x, "exact", 1)[0]
    assert_unbiased_with_power(grads.double(), truth.double(), sum(p.numel() for p in model.encoder.parameters()))


def test_bf16_is_refused_on_a_cpu_without_fast_bf16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx512f", "avx2"})
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--precision", "bf16", "--device", "cpu",
                           "--out", tmp_path / "run")
    assert_one_line_error(code, err, "--precision bf16 needs fast bf16 hardware")
    assert "AVX512-BF16" in err and not (tmp_path / "run").exists()


@contextmanager
def dtype_probe(monkeypatch):
    """Records the output dtypes of the networks' matrix products (``nn.Linear`` and convolutions but the fp32
    ``Head``), keyed by whether autograd was on (a training step) or off (metrics, evaluation), and of the log-space
    sums (the likelihood's sum over pixels, the latent's log-probabilities). The pre-flight checks before training
    (the memory estimate on the meta device, ``check_estimator``'s 2-row forward pass) are not the run's arithmetic."""
    seen = {"step": set(), "no_grad": set(), "head": set(), "log_space": set()}
    preflight = []
    check_estimator = training.check_estimator

    def checked(*args):
        preflight.append(1)
        try:
            return check_estimator(*args)
        finally:
            preflight.pop()

    def hook(module, inputs, output):
        if preflight or not isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) or output.is_meta:
            return
        if isinstance(module, models.Head):
            seen["head"].add(output.dtype)
        else:
            seen["step" if torch.is_grad_enabled() else "no_grad"].add(output.dtype)

    def logged(function):
        def call(*args, **kwargs):
            out = function(*args, **kwargs)
            seen["log_space"].add(out.dtype)
            return out
        return call

    monkeypatch.setattr(likelihoods.BernoulliLikelihood, "log_prob",
                        staticmethod(logged(likelihoods.BernoulliLikelihood.log_prob)))
    monkeypatch.setattr(distributions.Bernoulli, "log_prob", logged(distributions.Bernoulli.log_prob))
    monkeypatch.setattr(training, "check_estimator", checked)
    handle = register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_a_bf16_run_trains_resumes_and_evaluates_in_bf16(tmp_path, capsys, monkeypatch):
    """What the run says (config.json, eval.json) and what runs: every matrix product of the training steps, the
    epoch metrics and ``evaluate`` in bf16, the encoder's head and every log-space sum in fp32."""
    from helpers import train_digits

    monkeypatch.setattr(speed, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # accepted on any CPU
    with dtype_probe(monkeypatch) as trained:
        run = train_digits(tmp_path / "run", "--precision", "bf16", "--binarize", "dynamic")
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert trained == {"step": {torch.bfloat16}, "no_grad": {torch.bfloat16}, "head": {torch.float32},
                       "log_space": {torch.float32}}
    assert run_cli(capsys, "train", "--resume", "--out", run, "--epochs", "2", "--quiet")[0] == 0
    with dtype_probe(monkeypatch) as evaluated:
        code, out, _ = run_cli(capsys, "evaluate", run, "--k", "10", "--precision", "bf16")
    assert code == 0 and json.loads((run / "eval.json").read_text())["precision"] == "bf16"
    assert evaluated["step"] | evaluated["no_grad"] == {torch.bfloat16}
    assert evaluated["head"] == evaluated["log_space"] == {torch.float32}


def test_compile_falls_back_with_one_line_where_no_compiler_works(tmp_path, capsys, monkeypatch):
    def broken_compile(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("simulated: no working C++ compiler found\nsecond line")
        return call

    data = small_digits()
    base = dict(dataset="digits", latent_dim=8, epochs=1, batch_size=64, binarize="dynamic", estimator="disarm",
                estimator_options={"num_samples": 2}, grad_var_every=0)
    eager = train(Config(**base, out=str(tmp_path / "eager")), progress=False, data=data)
    capsys.readouterr()
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallen = train(Config(**base, compile=True, out=str(tmp_path / "compiled")), progress=False, data=data)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile: torch.compile does not work here" in err[0] and "simulated" in err[0], err
    assert torch.equal(params(eager.model), params(fallen.model))  # the fallback is the run without compile


def test_compiled_training_matches_eager(tmp_path, capsys):
    """With the deterministic ``exact`` estimator and grey data, compiled and eager steps differ only by rounding.
    Adam divides by the root of the squared gradients' average, so where a gradient is near 0 rounding can move the
    update by up to lr: after 4 steps at most 4 lr apart, and all but a few parameters within 1e-5."""
    data = small_digits()
    base = dict(dataset="digits", latent="categorical", latent_dim=10, epochs=1, batch_size=128, estimator="exact",
                grad_var_every=0)
    eager = train(Config(**base, out=str(tmp_path / "eager")), progress=False, data=data)
    capsys.readouterr()
    compiled = train(Config(**base, compile=True, out=str(tmp_path / "compiled")), progress=False, data=data)
    assert "warning" not in capsys.readouterr().err
    diff = (params(compiled.model) - params(eager.model)).abs()
    assert diff.max() <= 4 * 1e-3 and (diff > 1e-5).float().mean() < 1e-3, diff.max()


class InfiniteGradient(torch.autograd.Function):
    """The identity whose gradient is +inf: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


@pytest.mark.parametrize("poison", [lambda out: out * float("nan"), InfiniteGradient.apply],
                         ids=["nan-loss", "inf-gradient"])
def test_the_guard_names_the_first_non_finite_step_of_a_later_epoch(tmp_path, poison):
    """A NaN loss, or a finite loss with infinite gradients, at training step 11 (epoch 2 of 8-step epochs) stops
    the run naming that step, whatever the guard's interval, and leaves the checkpoint of epoch 1 as it was."""
    calls = {"n": 0}

    def nan_at_step_11(q, f, num_samples=1):
        out = importance(q, f, num_samples)
        if torch.is_grad_enabled() and q.logits.device.type == "cpu":  # a training step (not the memory check)
            calls["n"] += 1
            if calls["n"] == 11:
                return poison(out)
        return out

    run = tmp_path / "run"
    cfg = Config(dataset="digits", latent_dim=8, epochs=3, batch_size=64, grad_var_every=0, out=str(run))
    with pytest.raises(Diverged, match=r"at epoch 2, step 11 .*last good checkpoint \(epoch 1\)"):
        train(cfg, progress=False, data=small_digits(), estimator=nan_at_step_11)
    assert [int(r["epoch"]) for r in read_metrics(run)] == [1]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8


def denormal_survives() -> bool:
    """Whether a float below 2^-126 is computed as such (torch's default), not flushed to 0."""
    return (torch.tensor([1e-30]) * 1e-10).item() != 0.0


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")  # torch's default
def test_training_and_evaluation_flush_denormals_and_keep_them_again_after(tmp_path, monkeypatch):
    from discvae import evaluation
    from discvae.callbacks import Callback

    class Probe(Callback):
        def on_step_end(self, state, terms):
            seen.append(denormal_survives())

    seen = []
    assert denormal_survives()
    cfg = Config(dataset="digits", latent_dim=8, epochs=1, batch_size=256, grad_var_every=0, out=str(tmp_path / "r"))
    train(cfg, progress=False, data=small_digits(), callbacks=[Probe()])
    assert seen and not any(seen) and denormal_survives()
    during = []
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **kw: during.append(denormal_survives()) or {})
    evaluation.evaluate_run(tmp_path / "r", k=2)
    assert during == [False] and denormal_survives()


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals")
def test_flush_denormals_leaves_a_caller_who_flushed_already_flushing():
    from discvae.speed import flush_denormals, flushing_denormals

    assert not flushing_denormals() and denormal_survives()
    try:
        torch.set_flush_denormal(True)
        assert flushing_denormals() and not denormal_survives()
        with flush_denormals():
            assert not denormal_survives()
        assert flushing_denormals() and not denormal_survives()  # the caller's setting, not torch's default
    finally:
        torch.set_flush_denormal(False)
    with flush_denormals():
        assert flushing_denormals()
    assert not flushing_denormals() and denormal_survives()


def test_the_lean_adam_step_is_torch_adams_bit_for_bit_and_shares_its_state_dict():
    torch.manual_seed(0)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    lean, reference = speed.adam(ours, 1e-2), torch.optim.Adam(theirs, lr=1e-2, fused=True)
    assert isinstance(lean, speed.FusedAdam)
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            a.grad, b.grad = (None, None) if step < 2 and i == 3 else (grads[i].clone(), grads[i].clone())
        if step == 4:  # a changed lr is read at every step
            lean.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 3e-3
        lean.step()
        reference.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), step
    mine, other = lean.state_dict(), reference.state_dict()
    assert mine["param_groups"] == other["param_groups"]
    for index, state in other["state"].items():
        assert all(torch.equal(mine["state"][index][key], value) for key, value in state.items())
        assert mine["state"][index]["step"].dtype == torch.float32
    assert float(mine["state"][3]["step"]) == 4  # no gradient in the first two steps: no update, no count
    lean.zero_grad()
    assert all(p.grad is None for p in ours)


def test_the_lean_adam_step_runs_the_optimizer_hooks_through_adams_own_step():
    p = torch.ones(3, requires_grad=True)
    optimizer, seen = speed.adam([p], 0.1), []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.append(opt))
    p.grad = torch.ones(3)
    optimizer.step()
    assert seen == [optimizer] and bool((p < 1).all())
    optimizer.zero_grad()
    optimizer.step()  # no gradient: nothing to do
    assert float(optimizer.state[p]["step"]) == 1
