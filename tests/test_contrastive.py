"""The contrastive terms (``--contrastive``, ``--cluster-contrastive``, ``--gaussian-contrastive``): the discrete
families' expected agreement against enumeration of every pair of states and their outcome probabilities against
their marginals, the Gaussian's agreement as the cosine of the means, each InfoNCE term and its gradient against a
direct computation, known values, the objective, the checks, and runs."""
import csv
import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from discvae import Config, Dataset, load_dataset, train
from discvae.distributions import Bernoulli, Categorical, Gaussian, Joint
from discvae.errors import InputError
from discvae.estimators import make_estimator
from discvae.models import Terms
from discvae.training import objective
from helpers import tiny_data, tiny_model


def enumerated_agreement(q, other) -> torch.Tensor:
    """sum over every pair of states (z, z') of q_i(z) q'_j(z') times the share of units in which they agree."""
    states = q.enumerate()
    p, r = q.log_prob(states[:, None]).exp(), other.log_prob(states[:, None]).exp()  # [S, B], [S, B']
    return sum(p[a][:, None] * r[b][None, :] * share_agreeing(q, states[a], states[b])
               for a, b in itertools.product(range(len(states)), repeat=2))


def share_agreeing(q, z, z2) -> float:
    """The share of units in which the states z and z2 of q agree (a Joint: the mean over its blocks)."""
    if isinstance(q, Joint):
        pieces = zip(q.parts, q.part_slices, strict=True)
        return sum(share_agreeing(part, z[s], z2[s]) for (_, part), s in pieces) / len(q.parts)
    if isinstance(q, Categorical):
        same = (z.reshape(q.groups, -1) == z2.reshape(q.groups, -1)).all(-1)
        return same.double().mean().item()
    return (z == z2).double().mean().item()


def test_agreement_is_the_expected_share_of_agreeing_units():
    torch.manual_seed(0)
    a, b = torch.randn(2, 6, dtype=torch.float64) * 2, torch.randn(3, 6, dtype=torch.float64) * 2
    for q, other in ((Bernoulli(a[:, :3]), Bernoulli(b[:, :3])),
                     (Categorical(a, groups=2), Categorical(b, groups=2)),  # two groups of 3 classes
                     (Joint([("bernoulli", Bernoulli(a[:, :2])), ("categorical", Categorical(a[:, 2:5]))]),
                      Joint([("bernoulli", Bernoulli(b[:, :2])), ("categorical", Categorical(b[:, 2:5]))]))):
        got = q.agreement(other)
        assert got.shape == (2, 3)
        assert torch.allclose(got, enumerated_agreement(q, other), rtol=1e-10, atol=1e-12)
    sure = Bernoulli(torch.tensor([[50.0, -50.0, 50.0]], dtype=torch.float64))
    assert torch.allclose(sure.agreement(sure), torch.ones(1, 1, dtype=torch.float64))  # the same confident code
    assert torch.allclose(sure.agreement(Bernoulli(-sure.logits)), torch.zeros(1, 1, dtype=torch.float64))
    assert torch.allclose(Bernoulli(torch.zeros(1, 4)).agreement(Bernoulli(torch.randn(1, 4))),
                          torch.full((1, 1), 0.5))  # a fair coin agrees with anything half the time


def direct_symmetric_infonce(scores: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE of a square score matrix, written out pair by pair."""
    n = len(scores)
    one_way = -sum(scores[i, i] - torch.logsumexp(scores[i], 0) for i in range(n)) / n
    other_way = -sum(scores[i, i] - torch.logsumexp(scores[:, i], 0) for i in range(n)) / n
    return (one_way + other_way) / 2


def direct_infonce(q, view, tau):
    """The instance-level term: each image's code against each view's, agreement computed one pair at a time."""
    return direct_symmetric_infonce(torch.stack([torch.stack([q_row.agreement(v_row)[0, 0] for v_row in rows(view)])
                                                 for q_row in rows(q)]) / tau)


def rows(q):
    return [q.__class__(q.logits[i:i + 1]) for i in range(len(q.logits))]


def direct_cluster_infonce(q, view, tau):
    """The cluster-level term: each outcome's column against each of the view's, by ``cosine_similarity``."""
    a, b = q.outcome_probs(), view.outcome_probs()
    return direct_symmetric_infonce(torch.stack([torch.stack([F.cosine_similarity(a[:, u], b[:, v], dim=0)
                                                              for v in range(b.shape[1])])
                                                 for u in range(a.shape[1])]) / tau)


def direct_gaussian_infonce(q, view, tau):
    """The Gaussian term: each image's posterior means against each view's, by ``cosine_similarity``."""
    a, b = q.continuous_part.mean, view.continuous_part.mean
    return direct_symmetric_infonce(torch.stack([torch.stack([F.cosine_similarity(a_row, b_row, dim=0) for b_row in b])
                                                 for a_row in a]) / tau)


@pytest.mark.parametrize("term, direct, latent, size, estimator", [
    ("contrastive", direct_infonce, "bernoulli", 3, "exact"),
    ("contrastive", direct_infonce, "categorical", 4, "exact"),
    ("cluster_contrastive", direct_cluster_infonce, "bernoulli", 3, "exact"),
    ("cluster_contrastive", direct_cluster_infonce, "categorical", 4, "exact"),
    ("gaussian_contrastive", direct_gaussian_infonce, "gaussian", 3, "reparam"),
    ("gaussian_contrastive", direct_gaussian_infonce, "categorical:3+gaussian:2", None, "exact")])
def test_each_term_and_its_gradient_against_a_direct_computation(term, direct, latent, size, estimator):
    model, x, view = tiny_model(latent, size), tiny_data(n=5), tiny_data(n=5, seed=2)
    estimate = make_estimator(estimator)
    terms = model(x, estimate, view)
    alone = model(x, estimate)  # no view: no term, and none logged
    assert getattr(alone, term)(0.5) is None and term not in alone.values({term: 0.5})
    got = getattr(terms, term)(0.5)
    assert torch.allclose(terms.values({term: 0.5})[term], got) and term not in terms.values()
    # the gradient flows through both sides: compare with the term written out on fresh posteriors
    model.zero_grad()
    got.backward()
    ours = [p.grad.clone() for p in model.encoder.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.parameters())
    model.zero_grad()
    expected = direct(model.posterior(x), model.posterior(view), 0.5)
    expected.backward()
    assert torch.allclose(got, expected, rtol=1e-10)
    for mine, theirs in zip(ours, (p.grad for p in model.encoder.parameters()), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-8, atol=1e-12)
    model.zero_grad()
    fixed = model.space.posterior(model.encoder(x).detach(), model.prior)
    direct(fixed, model.posterior(view), 0.5).backward()
    assert not torch.allclose(ours[0], model.encoder.weight.grad)  # not the consistency term's one-sided gradient


def test_a_gaussian_agrees_by_the_cosine_of_its_means_and_the_parts_split_by_kind():
    torch.manual_seed(2)
    a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    expected = F.cosine_similarity(a[:, None, :4], b[None, :, :4], dim=-1)
    assert torch.allclose(Gaussian(a).agreement(Gaussian(b)), expected, rtol=1e-12)
    assert torch.allclose(Gaussian(a).agreement(Gaussian(a * 3)).diagonal(), torch.ones(3, dtype=torch.float64))
    bits, gauss, cats = Bernoulli(a[:, :2]), Gaussian(a[:, 2:6]), Categorical(a[:, 5:8])
    assert bits.continuous_part is None and gauss.continuous_part is gauss and gauss.discrete_part is None
    hybrid = Joint([("bernoulli", bits), ("gaussian", gauss)])
    assert hybrid.continuous_part is gauss and hybrid.discrete_part is bits
    both = Joint([("bernoulli", bits), ("categorical", cats)])
    assert both.discrete_part is both and both.continuous_part is None
    two = Joint([("bernoulli", bits), ("g1", gauss), ("g2", Gaussian(b[:, :2].repeat(2, 1)[:3]))]).continuous_part
    assert isinstance(two, Joint) and [name for name, _ in two.parts] == ["g1", "g2"]


def test_the_objective_adds_each_weighted_term():
    model, x, view = tiny_model("categorical", 4), tiny_data(n=5), tiny_data(n=5, seed=2)
    terms = model(x, make_estimator("exact"), view)
    cfg = Config(latent="categorical", latent_dim=4, contrastive=2.0, contrastive_tau=0.3, cluster_contrastive=3.0,
                 cluster_contrastive_tau=0.5)
    both = terms.loss + 2.0 * terms.contrastive(0.3) + 3.0 * terms.cluster_contrastive(0.5)
    assert torch.allclose(objective(terms, cfg, 0), both)
    assert torch.allclose(objective(terms, Config(latent="categorical", latent_dim=4), 0), terms.loss)
    hybrid = tiny_model("categorical:3+gaussian:2")
    terms = hybrid(x, make_estimator("exact"), view)
    cfg = Config(latent="categorical:3+gaussian:2", estimator="reparam", cluster_contrastive=3.0,
                 gaussian_contrastive=4.0, gaussian_contrastive_tau=0.7)
    three = terms.loss + 3.0 * terms.cluster_contrastive(1.0) + 4.0 * terms.gaussian_contrastive(0.7)
    assert torch.allclose(objective(terms, cfg, 0), three)


def test_distinct_confident_codes_that_match_their_views_score_near_zero():
    codes = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64) * 40
    terms = Terms(*([torch.zeros(())] * 4), {}, None, Bernoulli(codes), Bernoulli(codes))
    # each code agrees with its own view on 3 of 3 bits and with every other on 1 of 3
    expected = -math.log(math.exp(1 / 0.1) / (math.exp(1 / 0.1) + 3 * math.exp((1 / 3) / 0.1)))
    assert abs(terms.contrastive(0.1).item() - expected) < 1e-9 and expected < 0.01
    blurred = Terms(*([torch.zeros(())] * 4), {}, None, Bernoulli(codes * 0), Bernoulli(codes * 0))
    assert abs(blurred.contrastive(0.1).item() - math.log(4)) < 1e-9  # fair coins: chance, ln B


def test_orthogonal_means_that_match_their_views_score_their_floor():
    means = torch.cat([torch.eye(4, dtype=torch.float64) * 3, torch.zeros(4, 4, dtype=torch.float64)], -1)
    sure = Terms(*([torch.zeros(())] * 4), {}, None, Gaussian(means), Gaussian(means * 2))
    # cosine 1 with its own view, 0 with the others': ln(1 + 3 e^(-1 / tau))
    assert abs(sure.gaussian_contrastive(0.5).item() - math.log(1 + 3 * math.exp(-2))) < 1e-9
    same = Terms(*([torch.zeros(())] * 4), {}, None, Gaussian(means[[0] * 4]), Gaussian(means[[0] * 4]))
    assert abs(same.gaussian_contrastive(0.5).item() - math.log(4)) < 1e-9  # one direction for all: chance, ln B


def test_outcome_probs_are_each_units_marginals():
    torch.manual_seed(1)
    a = torch.randn(4, 7, dtype=torch.float64)
    bits, groups = Bernoulli(a[:, :3]), Categorical(a[:, 1:7], groups=2)  # two groups of 3 classes
    joint = Joint([("bernoulli", bits), ("categorical", Categorical(a[:, 3:6]))])
    for q, units in ((bits, 3), (groups, 2), (joint, 4)):
        states, got = q.enumerate(), q.outcome_probs()
        weights = q.log_prob(states[:, None]).exp()  # [S, B]
        # q(unit u = v) = sum over the states whose unit u is v: a state's outcomes as indicators
        expected = torch.einsum("sb,sm->bm", weights, outcome_indicators(q, states))
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
        assert torch.allclose(got.sum(-1), torch.full((4,), float(units), dtype=torch.float64))


def outcome_indicators(q, states) -> torch.Tensor:
    """[S, M]: for each state, 1 where unit u takes value v, in ``outcome_probs``' order."""
    if isinstance(q, Joint):
        return torch.cat([outcome_indicators(part, states[:, s]) for (_, part), s in zip(q.parts, q.part_slices,
                                                                                          strict=True)], -1)
    return torch.cat([states, 1 - states], -1) if isinstance(q, Bernoulli) else states


def test_distinct_confident_clusters_that_match_their_views_score_their_floor():
    clusters = torch.eye(4, dtype=torch.float64).repeat(2, 1) * 40  # 8 images, 4 clusters of two each
    sure = Terms(*([torch.zeros(())] * 4), {}, None, Categorical(clusters), Categorical(clusters))
    # each cluster's column has cosine 1 with its view's and 0 with the others': ln(1 + 3 e^(-1 / tau))
    assert abs(sure.cluster_contrastive(0.5).item() - math.log(1 + 3 * math.exp(-2))) < 1e-9
    swapped = Terms(*([torch.zeros(())] * 4), {}, None, Categorical(clusters), Categorical(clusters.roll(1, -1)))
    # each view's column matches another cluster's: ln(e^(1 / tau) + 3), above chance
    assert abs(swapped.cluster_contrastive(0.5).item() - math.log(math.exp(2) + 3)) < 1e-9
    blurred = Terms(*([torch.zeros(())] * 4), {}, None, Categorical(clusters * 0), Categorical(clusters * 0))
    assert abs(blurred.cluster_contrastive(0.5).item() - math.log(4)) < 1e-9  # equal columns: chance, ln M


def test_the_settings_are_checked():
    for settings, match in (({"contrastive": -1.0}, "contrastive must be a finite number >= 0"),
                            ({"contrastive": math.nan}, "contrastive must be a finite number >= 0"),
                            ({"contrastive": 1.0, "latent": "gaussian"}, "contrastive needs a latent with a discrete"),
                            ({"contrastive_tau": 0.0}, "contrastive_tau must be a positive finite number"),
                            ({"contrastive_tau": math.inf}, "contrastive_tau must be a positive finite number"),
                            ({"cluster_contrastive": -2.0}, "cluster_contrastive must be a finite number >= 0"),
                            ({"cluster_contrastive": 1.0, "latent": "gaussian"},
                             "cluster_contrastive needs a latent with a discrete"),
                            ({"cluster_contrastive_tau": -1.0},
                             "cluster_contrastive_tau must be a positive finite number"),
                            ({"gaussian_contrastive": math.inf}, "gaussian_contrastive must be a finite number >= 0"),
                            ({"gaussian_contrastive": 1.0}, "gaussian_contrastive needs a latent with a Gaussian"),
                            ({"gaussian_contrastive_tau": 0.0},
                             "gaussian_contrastive_tau must be a positive finite number")):
        with pytest.raises(InputError, match=match):
            Config(**settings).check()
    cfg = Config(latent="bernoulli", contrastive=1.0).check()
    assert cfg.views and not Config().views and Config(consistency=1.0).views
    assert Config(latent="bernoulli", cluster_contrastive=1.0).check().views
    gaussian = Config(latent="gaussian", estimator="reparam", gaussian_contrastive=1.0).check()
    assert gaussian.views and gaussian.contrastive_taus() == {"gaussian_contrastive": 0.5}


BITS = dict(latent="bernoulli", latent_dim=8, estimator="disarm", estimator_options={"num_samples": 2})


@pytest.mark.parametrize("term, chance, latent", [("contrastive", math.log(64), BITS),
                                                  ("cluster_contrastive", math.log(16), BITS),
                                                  ("gaussian_contrastive", math.log(64) + 2 / 0.5,
                                                   dict(latent="gaussian", latent_dim=4, estimator="reparam"))])
def test_a_run_with_a_contrastive_term_alone_draws_views_logs_it_and_resumes_exactly(tmp_path, term, chance, latent):
    digits = load_dataset("digits")
    data = Dataset("digits", digits.x_train[:256], digits.y_train[:256], digits.x_test[:64], digits.y_test[:64])
    base = dict(dataset="digits", **latent, batch_size=64, binarize="dynamic", grad_var_every=0, seed=3)
    base[term] = 2.0
    full = train(Config(**base, epochs=2, out=str(tmp_path / "full")), progress=False, data=data)
    train(Config(**base, epochs=1, out=str(tmp_path / "cut")), progress=False, data=data)
    resumed = train(Config(**base, epochs=2, out=str(tmp_path / "cut")), resume=True, progress=False, data=data)
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with open(tmp_path / "full" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    # at most chance: ln B images for the instances, ln 2c outcomes for the clusters; cosines span [-1, 1], so
    # the Gaussian term stays below ln B + 2 / tau
    assert all(0 < float(r[f"train_{term}"]) < chance + 1e-6 for r in rows)
    assert float(rows[1][f"train_{term}"]) < float(rows[0][f"train_{term}"])
    plain = train(Config(**{**base, term: 0.0}, epochs=2, out=str(tmp_path / "plain")), progress=False,
                  data=data)  # the term reaches the loss: without it the weights differ
    assert not torch.equal(next(plain.model.encoder.parameters()), next(full.model.encoder.parameters()))
