"""Estimators with learned state (``discvae.learned``): what they learn is the gradient of their own objective and
reaches nothing else, nvil's normalisation and running moments, rws against its own target, checkpoints that hold
their state and resume bit for bit (also on 2 ranks), compare, and one-line errors. Their unbiasedness at initial
and moved state is in ``test_unbiasedness.py``."""
import dataclasses
import itertools
import json
import math

import pytest
import torch
from test_distributed import torchrun
from test_stacked import digits
from test_train import params
from test_unbiasedness import moved

from discvae import ESTIMATORS, Config, InputError, LearnedEstimator, load_dataset, make_estimator, train
from discvae.distributions import Bernoulli
from discvae.experiments.compare import Comparison, compare, parse_spec
from discvae.learned import LEARNED, conditional_logistic
from discvae.runs import load_checkpoint, save_checkpoint
from helpers import assert_one_line_error, assert_unbiased_with_power, replica_grads, run_cli, tiny_data, tiny_model

VARIANCE_LEARNERS = ["rebar", "relax", "double-cv", "rodeo"]


def surrogate_and_eta(model, x, est, seed: int):
    """``est``'s surrogate on the tiny model's batch ``x`` with the logits as a leaf ``eta`` (same ``seed``)."""
    eta = model.encoder(x).detach().requires_grad_()
    torch.manual_seed(seed)
    return est(Bernoulli(eta), lambda z: model.log_likelihood(x, z)), eta


def objective(model, x, est, seed: int) -> torch.Tensor:
    """What a control-variate estimator minimises, mean over batch and bits of its estimate of grad_eta squared."""
    surrogate, eta = surrogate_and_eta(model, x, est, seed)
    grad, = torch.autograd.grad(surrogate.sum(), eta)
    return grad.pow(2).mean()


@pytest.mark.parametrize("name", VARIANCE_LEARNERS)
def test_what_a_control_variate_learns_is_the_gradient_of_its_squared_estimate(name):
    """In training mode the loss's backward pass leaves on each parameter phi of the estimator d/dphi mean |g|^2
    (checked by central differences of the same draws in eval mode), and the model's gradients are exactly those of
    eval mode, where nothing is learned: the estimator's own gradient reaches nothing else."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    est = moved(make_estimator(name, num_samples=2 if name in ("double-cv", "rodeo") else 1), seed=3).double()
    seed = 5
    model.zero_grad()
    torch.manual_seed(seed)
    model(x, est).loss.backward()
    learned = {k: p.grad.clone() for k, p in est.named_parameters()}
    trained = [p.grad.clone() for p in model.parameters()]
    est.eval().zero_grad()
    model.zero_grad()
    torch.manual_seed(seed)
    model(x, est).loss.backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(trained, model.parameters(), strict=True))
    assert all(p.grad is None for p in est.parameters())
    h = 1e-5
    for key, p in est.named_parameters():
        index, values = (0,) * p.dim(), []
        for shift in (h, -2 * h, h):
            with torch.no_grad():
                p[index] += shift
            values.append(objective(model, x, est, seed))
        up, down = values[:2]
        assert learned[key][index].item() == pytest.approx(((up - down) / (2 * h)).item(), rel=1e-4, abs=1e-9), key


def test_learning_lowers_the_variance_of_double_cv_and_rodeo():
    """On a fixed batch, 200 Adam steps of the estimator's own parameters (the model held) lower the squared norm of
    its estimate below plain RLOO's (the initial state, alpha = beta = 0) by more than the noise of the measure."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    for name in ("double-cv", "rodeo"):
        est = make_estimator(name, num_samples=2).double()
        est(Bernoulli(torch.zeros(1, 3, dtype=torch.float64)), lambda z: z.sum(-1))
        opt = torch.optim.Adam(est.parameters(), lr=0.05)
        before = torch.stack([objective(model, x, est.eval(), s) for s in range(200)]).mean()
        est.train()
        for step in range(200):
            opt.zero_grad()
            torch.manual_seed(1000 + step)
            model(x, est).loss.backward()
            model.zero_grad()  # (the model held)
            opt.step()
        after = torch.stack([objective(model, x, est.eval(), s) for s in range(200)]).mean()
        assert after < 0.9 * before, (name, before, after)


def test_conditional_logistic_is_the_logistic_given_its_sign():
    """z~ of ``conditional_logistic`` with v ~ U(0, 1) has the law of z = eta + logit u given H(z) = b: its CDF at t
    is (sigma(t - eta) - sigma(-eta)) / sigma(eta) for b = 1 (and the mirror for b = 0), checked at quantiles; its
    gradient flows to eta."""
    eta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    v = torch.rand(200_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for b in (1.0, 0.0):
        z = conditional_logistic(eta, torch.full_like(v, b), v)
        assert ((z > 0) == bool(b)).all()
        for t in (0.3, 1.0, 2.5) if b else (-2.5, -1.0, -0.3):
            t = torch.tensor(t, dtype=torch.float64)
            low, p = torch.sigmoid(-eta), torch.sigmoid(eta)
            cdf = (torch.sigmoid(t - eta) - low) / p if b else torch.sigmoid(t - eta) / low
            assert (z <= t).double().mean().item() == pytest.approx(cdf.item(), abs=4e-3)
        assert torch.autograd.grad(z.sum(), eta)[0] != 0


def test_nvil_normalises_by_its_running_variance_and_updates_only_in_training():
    """nvil's encoder gradient (its surrogate's) is that of ``normalise=False`` divided by max(1, sqrt(v)) for the
    same draws and baseline network; its running mean and variance move in training mode only."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    grads = {}
    for normalise in (True, False):
        torch.manual_seed(0)
        est = make_estimator("nvil", num_samples=2, normalise=normalise).double().eval()
        est(Bernoulli(torch.zeros(1, 3, dtype=torch.float64)), lambda z: z.sum(-1))
        with torch.no_grad():
            est.var.fill_(9.0)
        before = [est.mean.clone(), est.var.clone()]
        torch.manual_seed(4)
        surrogate = est(model.posterior(x), lambda z: model.log_likelihood(x, z)).sum()
        grads[normalise], = torch.autograd.grad(surrogate, model.encoder.weight)
        assert torch.equal(est.mean, before[0]) and torch.equal(est.var, before[1])
    torch.testing.assert_close(grads[True], grads[False] / 3)
    est.train()
    model(x, est).loss.backward()
    assert est.mean.item() != 0 and est.var.item() != 9.0


def exact_rws(model, x, k: int = 2) -> torch.Tensor:
    """sum_b of the expectation over all K-tuples of states of rws's surrogate without its KL:
    ln (1/K) sum_k w_k (gradient to the decoder) + sum_k sg(w~_k) ln q(z_k) (to the encoder), the tuples weighted
    by their detached probability: what rws's gradient estimates."""
    q = model.posterior(x)
    states = q.enumerate()
    total = 0
    for tup in itertools.product(range(len(states)), repeat=k):
        z = states[list(tup)][:, None, :]  # [K, 1, D]
        log_q = q.log_prob(z)  # [K, B]
        log_w = model.log_likelihood(x, z) + q.prior_log_prob(z) - log_q.detach()
        weights = torch.softmax(log_w.detach(), 0)
        surrogate = torch.logsumexp(log_w, 0) + (weights * log_q).sum(0)
        total = total + log_q.detach().sum(0).exp() * surrogate
    return total.sum()


def test_rws_is_unbiased_for_its_own_target():
    """rws's gradient has the mean it claims, E over K-tuples of the wake-theta (IWAE) and wake-phi (inclusive KL)
    gradients, computed by enumerating all 4^2 tuples of a 2-bit model (plus the KL, which its loss cancels), with
    the power of the check stated as for the unbiased estimators (10 % detectable: its encoder gradient is small
    against its noise, so 150,000 replicas)."""
    model, x = tiny_model("bernoulli", 2), tiny_data()
    model.zero_grad()
    (exact_rws(model, x) + model.posterior(x).kl_to_prior().sum()).backward()
    truth = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.manual_seed(14)
    grads = replica_grads(model, x, "rws", 150_000, num_samples=2)
    assert_unbiased_with_power(grads, truth, sum(p.numel() for p in model.encoder.parameters()))


def test_every_registered_name_is_a_callable_with_parameters():
    """``make_estimator(name, num_samples=M)`` gives a callable ``est(q, f)`` for every registered name, its
    parameters reachable as ``est.parameters()`` (after the first call has sized a learning one's networks)."""
    q, f = Bernoulli(torch.zeros(2, 4)), lambda z: -z.sum(-1)
    for name in ESTIMATORS:
        est = make_estimator(name, num_samples=2)
        if name != "reparam":
            assert est(q, f).shape == (2,)
        params = list(est.parameters())
        assert bool(params) == (name in LEARNED), name
        assert isinstance(est, LearnedEstimator) == (name in LEARNED)


def learned_run(tmp_path, name, epochs, **more) -> Config:
    return Config(dataset="digits", arch="fc", hidden=32, latent_dim=6, binarize="dynamic", epochs=epochs,
                  batch_size=128, estimator=name, estimator_options={"num_samples": 2}, estimator_lr=1e-2,
                  grad_var_every=1, grad_var_repeats=2, out=str(tmp_path / name), **more)


@pytest.mark.parametrize("name", ["nvil", "relax", "rodeo"])
def test_a_learning_run_resumes_bit_for_bit(tmp_path, name):
    """Its checkpoint holds the estimator's state and optimizer; 1 epoch resumed to 3 equals 3 straight, every
    weight, buffer and moment; the estimator learned (its state moved from its start)."""
    data = digits()
    straight = train(learned_run(tmp_path / "a", name, 3), progress=False, data=data)
    train(learned_run(tmp_path / "b", name, 1), progress=False, data=data)
    resumed = train(learned_run(tmp_path / "b", name, 3), resume=True, progress=False, data=data)
    a, b = load_checkpoint(tmp_path / "a" / name), load_checkpoint(tmp_path / "b" / name)
    for key in ("model", "optimizer"):
        assert repr(a[key]) == repr(b[key])
    assert a["estimator"]["state"].keys() == straight.estimator.state_dict().keys()
    for key, value in a["estimator"]["state"].items():
        assert torch.equal(value, b["estimator"]["state"][key]), key
    assert repr(a["estimator"]["optimizer"]) == repr(b["estimator"]["optimizer"])
    start = {"nvil": ("mean", 0.0), "relax": ("scale", 1.0), "rodeo": ("alpha", 0.0)}[name]
    assert a["estimator"]["state"][start[0]].item() != start[1]
    assert [{k: v for k, v in row.items() if k != "time"} for row in resumed.history] == \
        [{k: v for k, v in row.items() if k != "time"} for row in straight.history]


def test_a_learning_run_resumes_bit_for_bit_on_two_ranks(tmp_path):
    """torchrun with 2 ranks: the estimator's gradients and running moments are averaged over the ranks (one
    state, saved by rank 0), and 1 epoch resumed to 2 on 2 ranks equals 2 straight on 2 ranks."""
    flags = ["train", "--dataset", "digits", "--latent-dim", "6", "--hidden", "32", "--estimator", "nvil",
             "--num-samples", "2", "--batch-size", "256", "--grad-var-every", "0", "--quiet"]
    torchrun(*flags, "--epochs", "2", "--out", tmp_path / "straight")
    torchrun(*flags, "--epochs", "1", "--out", tmp_path / "resumed")
    torchrun(*flags, "--epochs", "2", "--resume", "--out", tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / run) for run in ("straight", "resumed"))
    assert repr(a["model"]) == repr(b["model"])
    for key, value in a["estimator"]["state"].items():
        assert torch.equal(value, b["estimator"]["state"][key]), key
    assert a["estimator"]["state"]["mean"].item() != 0


def test_a_damaged_estimator_state_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint whose estimator entry is missing, of the wrong shape or not finite (re-sealed with a valid digest)
    is refused by --resume with one line naming it."""
    data = digits()
    cfg = learned_run(tmp_path, "rodeo", 1)
    train(cfg, progress=False, data=data)
    path = tmp_path / "rodeo" / "checkpoint.pt"
    good = load_checkpoint(tmp_path / "rodeo")
    damages = {"no state of the estimator": lambda c: c.pop("estimator"),
               "alpha is not a finite": lambda c: c["estimator"]["state"].update(alpha=torch.tensor(float("nan"))),
               "network.out.weight is not": lambda c: c["estimator"]["state"].update(
                   {"network.out.weight": torch.zeros(3, 100)}),
               "optimizer": lambda c: c["estimator"]["optimizer"]["param_groups"][0].update(lr=-1.0)}
    for message, damage in damages.items():
        save_checkpoint(path, good)
        ckpt = load_checkpoint(tmp_path / "rodeo")
        damage(ckpt)
        save_checkpoint(path, ckpt)
        code, _, err = run_cli(capsys, "train", "--resume", "--out", tmp_path / "rodeo", "--epochs", "2",
                               "--dataset", "digits")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    save_checkpoint(path, good)


def test_compare_runs_learning_estimators_and_stacked_refuses_them_up_front(tmp_path):
    base = dataclasses.replace(learned_run(tmp_path, "rloo", 1), grad_var_every=1)
    specs = [parse_spec(name, 2) for name in ("rloo", "rodeo", "nvil")]
    data = digits()
    out = compare(base, specs, Comparison(out=str(tmp_path / "cmp"), eval_every=1, iwae_k=4, iwae_n=16, final_k=4,
                                          final_n=16, bias_batch=16, bias_repeats=4), data=data)
    assert [row["label"] for row in out["final"]] == ["rloo", "rodeo", "nvil"]
    assert all(row["encoder_bias"] >= 0 for row in out["bias_variance"])
    with pytest.raises(InputError, match="estimator rodeo cannot train stacked .it learns"):
        compare(base, [parse_spec("rodeo", 2)], Comparison(out=str(tmp_path / "stacked"), seeds=[0, 1],
                                                          stacked=True), data=data)
    assert not (tmp_path / "stacked").exists()


def test_cli_trains_a_learning_estimator_with_its_own_rate(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--latent-dim", "6", "--hidden", "32",
                           "--estimator", "double-cv", "--num-samples", "2", "--estimator-lr", "0.01", "--epochs", "1",
                           "--batch-size", "256", "--grad-var-every", "0", "--quiet", "--out", tmp_path / "run")
    assert code == 0, err
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["estimator"]["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert ckpt["estimator"]["state"]["alpha"].item() != 0
    code, _, err = run_cli(capsys, "train", "--dataset", "digits", "--estimator", "rebar", "--estimator-lr", "-1",
                           "--out", tmp_path / "bad")
    assert code == 2 and "--estimator-lr must be a positive finite number" in err and len(err.strip().splitlines()) == 1


def test_a_learning_estimator_refuses_what_it_cannot_estimate(tmp_path):
    q, f = Bernoulli(torch.zeros(2, 3)), lambda z: z.sum(-1)
    with pytest.raises(InputError, match="rodeo needs num_samples of at least 2"):
        make_estimator("rodeo", num_samples=1)(q, f)
    with pytest.raises(InputError, match="relax needs a bernoulli latent"):
        train(Config(dataset="digits", latent="categorical", latent_dim=4, epochs=1, estimator="relax",
                     estimator_options={"num_samples": 1}, out=str(tmp_path / "run")), data=load_dataset("digits"))
    with pytest.raises(InputError, match="takes no option 'width'"):
        make_estimator("nvil", width=3)


def test_train_sets_a_learning_estimators_own_options(tmp_path, capsys):
    """``--estimator-option KEY=VALUE`` sets what compare's ``NAME:KEY=VALUE`` sets (relax's network width, its
    temperature), saved in the run's configuration and kept on resume; a bad one or a key given twice is one line,
    the estimator's own option named as it spells it."""
    out = tmp_path / "relax"
    argv = ["train", "--dataset", "digits", "--latent-dim", "6", "--epochs", "1", "--estimator", "relax", "--quiet"]
    code, _, err = run_cli(capsys, *argv, "--estimator-option", "hidden=16", "--estimator-option", "temperature=0.3",
                           "--out", out)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["estimator_options"] == {
        "num_samples": 1, "hidden": 16, "temperature": 0.3}
    state = load_checkpoint(out)["estimator"]["state"]
    assert state["network.0.weight"].shape[0] == 16 and state["log_temperature"].item() != math.log(0.5)
    resume = [*argv[:6], "2", *argv[7:], "--resume", "--out", out]  # two epochs, the saved options
    assert run_cli(capsys, *resume)[0] == 0 and load_checkpoint(out)["epoch"] == 2
    code, _, err = run_cli(capsys, *resume, "--estimator-option", "hidden=17")
    assert_one_line_error(code, err, "cannot change --estimator-option")
    for more, message in [(["--estimator-option", "hidden=0"], "relax needs hidden of at least 1, got 0"),
                          (["--estimator-option", "width=3"], "estimator relax takes no option 'width' (it takes "
                                                              "--num-samples, temperature, scale, hidden)"),
                          (["--num-samples", "2", "--estimator-option", "num_samples=2"],
                           "num_samples is given twice")]:
        code, _, err = run_cli(capsys, *argv, *more, "--out", tmp_path / "bad")
        assert_one_line_error(code, err, message)
    with pytest.raises(SystemExit) as stop:  # argparse's own one line
        run_cli(capsys, *argv, "--estimator-option", "hidden", "--out", tmp_path / "bad")
    assert_one_line_error(stop.value.code, capsys.readouterr().err, "'hidden' is not KEY=VALUE")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name,option,value,message", [
    ("nvil", "hidden", 0, "nvil needs hidden of at least 1, got 0"),
    ("nvil", "decay", 1.0, "nvil needs decay in [0, 1), got 1.0"),
    ("nvil", "decay", float("nan"), "nvil needs decay in [0, 1), got nan"),
    ("rebar", "temperature", 0.0, "rebar needs temperature positive and finite, got 0.0"),
    ("relax", "temperature", float("inf"), "relax needs temperature positive and finite, got inf"),
    ("rebar", "scale", float("nan"), "rebar needs scale finite, got nan"),
    ("relax", "hidden", 0, "relax needs hidden of at least 1, got 0"),
    ("rodeo", "hidden", 0, "rodeo needs hidden of at least 1, got 0"),
    ("rodeo", "hidden", 2.5, "rodeo needs hidden of at least 1, got 2.5"),
    ("rebar", "temperature", "hot", "rebar needs temperature positive and finite, got 'hot'"),
    ("relax", "scale", "big", "relax needs scale finite, got 'big'"),
    ("nvil", "decay", "slow", "nvil needs decay in [0, 1), got 'slow'"),
])
def test_a_learning_estimator_refuses_bad_options_in_one_line(name, option, value, message, capsys, tmp_path):
    """A bad option stops when the estimator is built, naming the option (a zero-width rodeo network trained
    silently, and torch warned from inside its initialisation); the CLI prints it as one line, the option named as
    the estimator spells it."""
    with pytest.raises(InputError) as err:
        make_estimator(name, **{option: value})
    assert str(err.value) == message and err.value.params == ()  # an estimator's option, not a flag
    code, _, err_text = run_cli(capsys, "compare", f"{name}:{option}={value}", "--dataset", "digits", "--epochs", 1,
                                "--out", tmp_path / "cmp")
    assert_one_line_error(code, err_text, name)
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("name", ["rebar", "rodeo"])
def test_a_learning_estimator_trains_in_bf16_and_keeps_its_best_epoch(tmp_path, name):
    """Under bf16 autocast the estimator's networks and control variates train (finite, state moved); with
    --keep-best the best epoch's run holds the estimator's state too, and resumes."""
    data = digits()
    cfg = learned_run(tmp_path, name, 2, precision="bf16", keep_best="invariance", augment={"rotation": 10.0})
    state = train(cfg, progress=False, data=data)
    assert all(torch.isfinite(torch.tensor(row["test_neg_elbo"])) for row in state.history)
    best = load_checkpoint(tmp_path / name / "best")
    assert best["estimator"]["state"].keys() == state.estimator.state_dict().keys()
    moved_from_start = {"rebar": ("scale", 1.0), "rodeo": ("alpha", 0.0)}[name]
    assert load_checkpoint(tmp_path / name)["estimator"]["state"][moved_from_start[0]].item() != moved_from_start[1]


def test_compile_runs_a_learning_estimator_uncompiled_with_one_line(tmp_path, capsys):
    """A learning estimator takes the gradient of its own objective inside the step (``descend``), which a compiled
    step cannot share (torch raised deep inside autograd for nvil, double-cv and rodeo): ``--compile`` says so in
    one line and the run is the run without it, weights and estimator state alike."""
    data = digits()
    for name in LEARNED:
        eager = train(learned_run(tmp_path / "eager", name, 1), progress=False, data=data)
        capsys.readouterr()
        fallen = train(learned_run(tmp_path / "compiled", name, 1, compile=True), progress=False, data=data)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--compile: {name} trains its own parameters" in err[0], err
        assert torch.equal(params(eager.model), params(fallen.model)), name
        for key, value in eager.estimator.state_dict().items():
            assert torch.equal(value, fallen.estimator.state_dict()[key]), (name, key)


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_a_uniform_draw_of_zero_leaves_rebar_and_relax_finite(name, monkeypatch):
    """torch.rand gives exactly 0 with probability 2^-24 per number (about once in 800 steps of 200 bits at batch
    100): the logistic sample and the conditional one stay finite, and so do the gradients, their own included."""
    model, x = tiny_model("bernoulli", 3), tiny_data()
    est = make_estimator(name, num_samples=1).double()
    real = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **k: real(*a, **k).zero_())
    model(x, est).loss.backward()
    grads = [p.grad for p in [*model.parameters(), *est.parameters()]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
