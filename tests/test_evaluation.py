"""The IWAE bound against exact ln p(x) on enumerable models; exact ln p(x) against brute force; latent usage;
``discvae evaluate``."""
import json
import math
import shutil
import time

import pytest
import torch
from torch import nn

import discvae.evaluation
import discvae.memory
import discvae.training
from discvae.cli import main
from discvae.distributions import USED_FRACTION
from discvae.errors import InputError
from discvae.estimators import EXACT_MAX_STATES
from discvae.evaluation import ACTIVE_THRESHOLD, evaluate_run, exact_log_likelihood, iwae_bound, latent_usage
from discvae.models import VAE
from helpers import Z_MAX, exact_expected_ll, tiny_data, tiny_model


def repeated_bounds(model, x, k: int, repeats: int) -> torch.Tensor:
    """``repeats`` independent K-sample bounds per row of ``x``, shape [repeats, N]."""
    return iwae_bound(model, x.repeat(repeats, 1), k=k, chunk=64, batch_size=len(x) * repeats).view(repeats, -1)


@pytest.mark.parametrize("latent, classes, groups", [("bernoulli", 3, 1), ("categorical", 4, 1),
                                                     ("categorical", 3, 2)])
def test_iwae_is_below_exact_and_approaches_it(latent, classes, groups):
    """E[IWAE_K] = ELBO for K = 1 (checked against enumeration), rises with K, stays <= ln p(x), and reaches it.

    The encoder is scaled up so q(z|x) is overconfident and the ELBO is > 0.2 nats below ln p(x). Each mean over R
    repeats is compared within Z_MAX standard errors (helpers.Z_MAX: a correct bound fails with probability < 1e-4);
    at K = 20000 the gap is below 5% of the ELBO's (asymptotically it shrinks like Var(w) / (2 K p(x)^2)).
    """
    torch.manual_seed(0)
    model, x = tiny_model(latent, classes, groups), tiny_data()
    with torch.no_grad():
        model.encoder.weight.mul_(5)
        model.encoder.bias.mul_(5)
    exact = exact_log_likelihood(model, x)
    elbo = exact_expected_ll(model, x) - model.posterior(x).kl_to_prior()
    assert (elbo < exact - 0.2).all()
    stats = []
    for k, repeats in ((1, 4000), (10, 1000), (100, 200), (20000, 10)):
        bounds = repeated_bounds(model, x, k, repeats)
        stats.append((bounds.mean(0), bounds.std(0) / repeats**0.5))
        mean, se = stats[-1]
        assert (mean <= exact + Z_MAX * se).all()
        if k == 1:
            assert ((mean - elbo).abs() <= Z_MAX * se).all()
    for (lower, se_l), (higher, se_h) in zip(stats, stats[1:], strict=False):
        assert (lower < higher + Z_MAX * (se_l**2 + se_h**2).sqrt()).all()
    assert ((exact - stats[-1][0]).abs() < 0.05 * (exact - elbo)).all()


class ExactPosteriorEncoder(nn.Module):
    """Logits eta_k = ln p(x | z = e_k) + ln p(e_k) for one categorical group: q(z|x) = p(z|x) exactly."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = [vae]  # not a submodule: no parameter sharing in state_dict

    def forward(self, x):
        vae = self.vae[0]
        states = torch.eye(vae.space.dim, dtype=x.dtype)[:, None, :]
        return vae.log_likelihood(x, states).T


def test_iwae_equals_exact_when_the_posterior_is_exact():
    model, x = tiny_model("categorical", 5), tiny_data(4)
    model.encoder = ExactPosteriorEncoder(model)
    exact = exact_log_likelihood(model, x)
    for k in (1, 3, 50):
        assert torch.allclose(iwae_bound(model, x, k=k, chunk=2), exact, atol=1e-10, rtol=0)


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_iwae_equals_exact_when_z_carries_no_information(latent):
    """A decoder that ignores z and an encoder that outputs the prior: q(z|x) = p(z) = p(z|x)."""
    model, x = tiny_model(latent, 4), tiny_data()
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.zero_()
        model.decoder[0].weight.zero_()
    exact = exact_log_likelihood(model, x)
    assert torch.allclose(iwae_bound(model, x, k=7, chunk=3), exact, atol=1e-10, rtol=0)


class Scripted:
    """q(z|x) whose ``sample`` returns the rows of a fixed ``[K, B, dim]`` tensor in order."""

    def __init__(self, q, z):
        self.q, self.z, self.used = q, z, 0

    def sample(self, n):
        self.used += n
        return self.z[self.used - n:self.used]

    def __getattr__(self, name):
        return getattr(self.q, name)


@pytest.mark.parametrize("max_states", [0, 8])
def test_iwae_matches_a_direct_computation(max_states):
    """Chunks of K and batches of x give ln (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), computed here term by term,
    whether each sample is decoded (``max_states`` 0) or looked up in the table over all 8 states."""
    model, x, k, bits = tiny_model("bernoulli", 3), tiny_data(5), 7, 3
    z = torch.randint(0, 2, (k, len(x), bits), generator=torch.Generator().manual_seed(0)).double()
    real_posterior, offset = model.posterior, [0]

    def scripted_posterior(xb):
        offset[0] += len(xb)
        return Scripted(real_posterior(xb), z[:, offset[0] - len(xb):offset[0]])

    model.posterior = scripted_posterior
    bound = iwae_bound(model, x, k=k, chunk=3, batch_size=2, max_states=max_states)
    with torch.no_grad():
        for b in range(len(x)):
            q = torch.sigmoid(model.encoder(x[b])).tolist()
            weights = []
            for j in range(k):
                p = torch.sigmoid(model.decoder(z[j, b])).tolist()
                log_px_z = sum(xd * math.log(pd) + (1 - xd) * math.log(1 - pd)
                               for xd, pd in zip(x[b].tolist(), p, strict=True))
                log_q = sum(math.log(qi if zi else 1 - qi) for qi, zi in zip(q, z[j, b].tolist(), strict=True))
                weights.append(math.exp(log_px_z + bits * math.log(0.5) - log_q))
            assert bound[b].item() == pytest.approx(math.log(sum(weights) / k), abs=1e-10)


@pytest.mark.parametrize("latent, classes, groups", [("bernoulli", 4, 1), ("categorical", 5, 1),
                                                     ("categorical", 3, 3), ("categorical:3x2+bernoulli:2", None, 1)])
def test_state_index_numbers_the_enumerated_states(latent, classes, groups):
    q = tiny_model(latent, classes, groups).posterior(tiny_data())
    states = q.enumerate()
    assert len(states) == q.num_states == len(torch.unique(states, dim=0))
    assert torch.equal(q.state_index(states), torch.arange(len(states)))


@pytest.mark.parametrize("groups", [1, 2])
def test_exact_categorical_log_likelihood_is_the_brute_force_sum(groups):
    c = 4
    model, x = tiny_model("categorical", c, groups), tiny_data()
    got = exact_log_likelihood(model, x, batch_size=2)
    for b in range(len(x)):
        total = 0.0
        for classes in torch.cartesian_prod(*[torch.arange(c)] * groups).reshape(-1, groups):
            z = torch.zeros(groups, c, dtype=torch.float64)
            z[torch.arange(groups), classes] = 1.0
            total += math.exp(model.log_likelihood(x[b:b + 1], z.reshape(1, 1, -1)).item()) / c**groups
        assert got[b].item() == pytest.approx(math.log(total), abs=1e-10)


def test_latent_usage_of_an_unused_and_a_deterministic_code():
    x = tiny_data(200)
    model = tiny_model("bernoulli", 4)
    with torch.no_grad():
        model.encoder.weight.zero_()
        model.encoder.bias.zero_()
    usage = latent_usage(model, x)
    assert usage["active_units"] == 0 and usage["informative_units"] == 0
    assert usage["unit_information_bits"] == pytest.approx(0, abs=1e-12)
    assert usage["entropy_per_dim_bits"] == pytest.approx(1.0) and usage["aggregate_entropy_bits"] == pytest.approx(4)
    assert usage["posterior_entropy_nats"] == pytest.approx(4 * math.log(2))
    with torch.no_grad():  # bit 0 = [x_0 > 0.5] almost surely, bits 1-3 always 1
        model.encoder.weight[0, 0] = 1e3
        model.encoder.bias.copy_(torch.tensor([-500.0, 50.0, 50.0, 50.0]))
    usage = latent_usage(model, x)
    assert usage["active_units"] == 1 and usage["posterior_entropy_bits"] < 0.05
    assert usage["aggregate_entropy_bits"] == pytest.approx(1.0, abs=0.05)
    assert usage["informative_units"] == 1 and usage["unit_information_bits"] == pytest.approx(1.0, abs=0.05)
    cat = tiny_model("categorical", 10)
    with torch.no_grad():
        cat.encoder.weight.zero_()
        cat.encoder.bias.copy_(torch.tensor([0.0] * 9 + [-10.0]))  # class 9 gets mass 5e-5 < 1 / (10 * 10)
    usage = latent_usage(cat, x)
    assert usage["used_categories"] == 9 and usage["aggregate_entropy_bits"] == pytest.approx(math.log2(9), abs=1e-3)
    assert usage["informative_units"] == 0  # the same q for every x: no information about it


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A one-epoch digits run with a 6x2 categorical latent (36 states: ln p(x) is enumerated exactly)."""
    run = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["train", "--dataset", "digits", "--latent", "categorical", "--latent-dim", "6", "--groups", "2",
                 "--binarize", "dynamic", "--epochs", "1", "--batch-size", "512", "--out", str(run), "--quiet"]) == 0
    return run


def test_evaluate_command(digits_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--k", "20", "--chunk", "7", "--train-set"]) == 0
    out = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    assert "iwae (K=20)" in out and str(run / "eval.json") in out
    assert result["k"] == 20 and result["epoch"] == 1 and result["binarize"] == "dynamic"
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert {key: result[key] for key in ("run", "step", "train_seconds", "latent", "exact_max_states",
                                         "active_threshold", "used_fraction", "precision")} == {
        "run": str(run), "step": checkpoint["step"], "train_seconds": checkpoint["elapsed"],
        "latent": "categorical:6x2", "exact_max_states": EXACT_MAX_STATES, "active_threshold": ACTIVE_THRESHOLD,
        "used_fraction": USED_FRACTION, "precision": "fp32"}
    for split in ("test", "train"):
        r = result[split]
        assert r["neg_elbo"] == pytest.approx(r["kl"] - r["expected_ll"])
        assert -r["neg_elbo"] - 1.0 < r["iwae"] <= r["exact_log_px"] + 0.5  # 36 states: exact is enumerated
        assert 0 <= r["used_categories"] <= 12 and r["max_entropy_bits"] == pytest.approx(2 * math.log2(6))
    assert main(["evaluate", str(run), "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--k" in err
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


def test_evaluate_run_refusals_record_and_memory_estimate(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    for k, chunk, batch_size in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(InputError) as caught:
            evaluate_run(run, k, chunk, batch_size)
        assert str(caught.value) == "k, chunk and batch_size must be at least 1"
        assert caught.value.params == ("k", "chunk", "batch_size")
    start = time.perf_counter()
    one = evaluate_run(run, k=1, chunk=1, batch_size=1)  # 1 is allowed for each
    assert one["k"] == 1 and math.isfinite(one["test"]["iwae"])
    assert 0 < one["test"]["seconds"] <= time.perf_counter() - start + 0.01
    assert one["test"]["seconds"] == round(one["test"]["seconds"], 2) and isinstance(one["test"]["seconds"], float)
    # the seed binarises the evaluation set: exact ln p(x) (36 states, no sampling) changes with it alone
    other = evaluate_run(run, k=1, seed=3)
    assert other["test"]["exact_log_px"] != one["test"]["exact_log_px"]
    assert evaluate_run(run, k=1, seed=0)["test"]["exact_log_px"] == one["test"]["exact_log_px"]
    reads = []
    with pytest.MonkeyPatch.context() as patch:  # the checkpoint is read once: the epoch recorded is the weights'
        def counted(*args, load=discvae.evaluation.load_checkpoint, **kwargs):
            reads.append(args[0])
            return load(*args, **kwargs)
        patch.setattr(discvae.evaluation, "load_checkpoint", counted)
        patch.setattr(discvae.training, "load_checkpoint", counted)
        evaluate_run(run, k=1)
    assert len(reads) == 1
    # 36 states: ln p(x, z) is tabulated from the decoder's 64 pixel logits for every state and image, so 500 more
    # images at a time add at least 500 x 36 x 64 float32
    assert estimate(run, 7, 1000, train_set=True) - estimate(run, 7, 500, train_set=True) >= 500 * 36 * 64 * 4
    with pytest.MonkeyPatch.context() as patch:  # no memory free: refused before any work, with the estimate
        patch.setattr(discvae.memory, "available_bytes", lambda device: 1)
        for train_set, rows in ((False, 297), (True, 1500)):  # the digits' test and training sets
            with pytest.raises(InputError) as caught:
                evaluate_run(run, k=20, chunk=7, batch_size=10**6, train_set=train_set)
            message = str(caught.value)
            assert message.startswith(f"the bound's 7 samples of {rows} images at a time would need about ")
            assert message.endswith("free on cpu; lower chunk or batch_size")
            assert caught.value.params == ("chunk", "batch_size")
    (run / "eval.json").unlink()
    (run / "eval.json").mkdir()
    with pytest.raises(InputError, match=r"eval.json is a directory, not a file$"):
        evaluate_run(run, k=1)


class Estimated(Exception):
    pass


def estimate(run, chunk, batch_size, train_set=False, k=100):
    """The bytes ``evaluate_run`` estimates before the work (the memory check is stopped there)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(discvae.evaluation, "check_fits", lambda need, *rest: (_ for _ in ()).throw(Estimated(need)))
        with pytest.raises(Estimated) as caught:
            evaluate_run(run, k=k, chunk=chunk, batch_size=batch_size, train_set=train_set)
    return caught.value.args[0]


def test_evaluate_run_estimates_the_memory_of_one_chunk_of_a_convolutional_run(tmp_path):
    """The estimate runs the model on batches of the run's image shape [C, H, W] (a convolutional encoder given
    anything else fails on the meta device, and no estimate would be made), with one chunk of samples: 2^13 states
    are too many to tabulate, so each sample is decoded; a chunk holds ``chunk`` samples, never more than k."""
    run = tmp_path / "cnn"
    assert main(["train", "--dataset", "digits", "--arch", "cnn", "--latent-dim", "13", "--epochs", "1",
                 "--batch-size", "512", "--out", str(run), "--quiet"]) == 0
    small = estimate(run, 7, 10)
    assert isinstance(small, int) and 0 < small < estimate(run, 7, 20)
    assert estimate(run, 7, 100, k=5) < estimate(run, 7, 100, k=7) == estimate(run, 7, 100, k=100)
    assert estimate(run, 10, 5) < estimate(run, 50, 5)  # a chunk holds its samples whatever the images at a time


def test_defaults_are_the_documented_ones_and_precision_is_checked():
    """K = 1000 importance samples unless told (README, ``discvae evaluate``); an unknown precision is refused
    instead of silently running fp32."""
    import inspect

    from discvae.evaluation import evaluate
    for function in (iwae_bound, evaluate, evaluate_run):
        assert inspect.signature(function).parameters["k"].default == 1000, function
    for function in (evaluate, evaluate_run):
        assert inspect.signature(function).parameters["precision"].default == "fp32", function
    from discvae.evaluation import fixed_binarization
    for function in (evaluate_run, fixed_binarization):  # the evaluation set binarised with seed 0
        assert inspect.signature(function).parameters["seed"].default == 0, function
    model, x = tiny_model("bernoulli", 3), tiny_data(4)
    with pytest.raises(InputError, match="^unknown precision 'fp16'; choose one of fp32, bf16$"):
        evaluate(model, x, k=2, precision="fp16")
    assert set(evaluate(model, x, k=2)) >= {"neg_elbo", "iwae", "exact_log_px"}


def test_evaluate_passes_its_settings_on_and_is_exact_up_to_the_limit(monkeypatch):
    """``k``, ``chunk``, ``batch_size`` and ``precision`` reach the bound and the ELBO; a latent of exactly
    ``EXACT_MAX_STATES`` states (12 bits) gets ``exact_log_px``, one state more would not."""
    evaluation = discvae.evaluation
    seen = {}
    def spy(name, function):
        def wrapped(*args, **kwargs):
            seen[name] = (args[2:], kwargs)
            return function(*args, **kwargs)
        monkeypatch.setattr(evaluation, name, wrapped)
    spy("iwae_bound", evaluation.iwae_bound)
    spy("elbo_terms", evaluation.elbo_terms)
    assert EXACT_MAX_STATES == 2**12
    model, x = tiny_model("bernoulli", 12), tiny_data(3)
    out = evaluation.evaluate(model, x, k=5, chunk=2, batch_size=3)
    assert seen["iwae_bound"] == ((5, 2, 3), {}) and seen["elbo_terms"] == ((3,), {"precision": "fp32"})
    assert out["exact_log_px"] == pytest.approx(exact_log_likelihood(model, x).mean().item(), rel=1e-12)
    assert "exact_log_px" not in evaluation.evaluate(tiny_model("bernoulli", 13), x, k=2)


def test_unit_entropies_of_every_discrete_block_in_order():
    """``unit_entropies`` of a model: one pair of entries per bit and per categorical group of the discrete blocks,
    in the latent's order (the Gaussian block has none), each the posterior means' entropies of that unit."""
    from discvae.distributions import Bernoulli
    from discvae.evaluation import posterior_means, unit_entropies
    model, x = tiny_model("bernoulli:3+categorical:3x2+gaussian:2"), tiny_data(9)
    marginal, conditional = unit_entropies(model, x)
    mean = posterior_means(model, x)
    bits = Bernoulli.unit_entropies(mean[:, :3])
    probs = mean[:, 3:9].unflatten(-1, (2, 3))
    def h(p):
        return -(p * p.log()).sum(-1)
    assert marginal.shape == conditional.shape == (5,)
    assert torch.allclose(marginal, torch.cat([bits[0], h(probs.mean(0))]))
    assert torch.allclose(conditional, torch.cat([bits[1], h(probs).mean(0)]))
    none = unit_entropies(tiny_model("gaussian", 2), x)
    assert [t.shape for t in none] == [(0,), (0,)]


class _SwitchEncoder(nn.Module):
    """params of bernoulli:3+gaussian:2 from s = x_0 in {0, 1}: bit 0 = s almost surely, bit 1 a fair coin for every
    x, bit 2 with q = 0.7 or 0.3 (I(x; z_2) = ln 2 - H(0.7) = 0.082 nats, between the threshold 0.1 ln 2 = 0.069 and
    0.1 ln 3 or 0.1 / ln 2), the Gaussian's mean 3 s in its first dimension and 0 in its second."""

    def forward(self, x):
        sign = 2 * x[:, :1] - 1
        zero = torch.zeros_like(sign)
        logit = math.log(0.7 / 0.3)
        return torch.cat([20 * sign, zero, logit * sign, 3 * x[:, :1], zero, zero, zero], -1)


def test_latent_usage_of_a_hybrid_per_block_and_in_batches():
    from discvae.evaluation import posterior_means
    x = torch.zeros(10, 6, dtype=torch.float64)
    x[::2, 0] = 1.0
    model = VAE(_SwitchEncoder(), nn.Linear(5, 6).double(), "bernoulli:3+gaussian:2")
    assert torch.allclose(posterior_means(model, x, batch_size=3), model.posterior(x).mean.double())
    usage = latent_usage(model, x, batch_size=3)
    assert usage["active_units"] == 3  # bits 0 and 2, the Gaussian's first dimension
    assert (usage["bernoulli_active_units"], usage["gaussian_active_units"]) == (2, 1)
    assert usage["bernoulli_informative_units"] == 2
    assert usage["bernoulli_unit_information_nats"] == pytest.approx(math.log(2) + math.log(2) + 0.7 * math.log(0.7)
                                                                    + 0.3 * math.log(0.3), abs=1e-6)


def test_fixed_binarization_depends_on_its_seed_alone():
    from discvae.evaluation import fixed_binarization
    x = tiny_data(50)
    torch.manual_seed(0)
    a = fixed_binarization(x, "dynamic", 3)
    torch.manual_seed(1)
    assert torch.equal(fixed_binarization(x, "dynamic", 3), a)
    assert not torch.equal(fixed_binarization(x, "dynamic", 4), a)
    assert set(a.unique().tolist()) == {0.0, 1.0} and torch.equal(fixed_binarization(x, "none", 3), x)
