"""Latent families against torch.distributions and against enumeration."""
import math

import pytest
import torch
import torch.distributions as td

from discvae.distributions import Bernoulli, Categorical, Gaussian, Joint, Mixture, as_family
from discvae.errors import InputError

torch.manual_seed(0)
ETA = torch.randn(5, 6, dtype=torch.float64) * 3


def test_bernoulli_matches_torch():
    q, ref = Bernoulli(ETA), td.Bernoulli(logits=ETA)
    z = q.sample(4)
    assert z.shape == (4, 5, 6) and set(z.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.Bernoulli(probs=torch.full_like(ETA, 0.5))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_categorical_matches_torch(groups):
    q = Categorical(ETA, groups)
    ref = td.OneHotCategorical(logits=ETA.unflatten(-1, (groups, 6 // groups)))
    z = q.sample(4)
    assert z.shape == (4, 5, 6)
    assert torch.equal(z.unflatten(-1, (groups, 6 // groups)).sum(-1), torch.ones(4, 5, groups, dtype=z.dtype))
    assert torch.allclose(q.log_prob(z), ref.log_prob(z.unflatten(-1, (groups, -1))).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.OneHotCategorical(logits=torch.zeros_like(ref.logits))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))


def test_gaussian_matches_torch():
    q = Gaussian(ETA)
    mu, logvar = ETA.chunk(2, -1)
    ref = td.Normal(mu, (0.5 * logvar).exp())
    z = q.rsample(3)
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(-1))
    assert torch.allclose(q.entropy(), ref.entropy().sum(-1))
    prior = td.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    assert torch.allclose(q.kl_to_prior(), td.kl_divergence(ref, prior).sum(-1))
    assert torch.allclose(q.prior_log_prob(z), prior.log_prob(z).sum(-1))


@pytest.mark.parametrize("q", [Bernoulli(ETA[:, :4]), Categorical(ETA, 1), Categorical(ETA, 2)],
                         ids=["bernoulli", "categorical", "categorical-2-groups"])
def test_enumeration_agrees(q):
    states = q.enumerate()[:, None, :]
    assert len(states.unique(dim=0)) == len(states)
    logq = q.log_prob(states)
    assert torch.allclose(torch.logsumexp(logq, 0), torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(q.entropy(), -(logq.exp() * logq).sum(0))
    kl = (logq.exp() * (logq - q.prior_log_prob(states))).sum(0)
    assert torch.allclose(q.kl_to_prior(), kl)
    assert torch.allclose(torch.logsumexp(q.prior_log_prob(states), 0), torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("make", [lambda e: Bernoulli(e), lambda e: Categorical(e, 2)], ids=["bernoulli", "cat"])
def test_sampling_frequencies(make):
    q = make(ETA[:2] / 3)
    n = 40000
    freq = q.sample(n).mean(0)
    se = (q.mean * (1 - q.mean) / n).sqrt()
    assert ((freq - q.mean).abs() / se).max() < 5


@pytest.mark.parametrize("make", [lambda e: Bernoulli(e), lambda e: Categorical(e, 2)], ids=["bernoulli", "cat"])
def test_stable_for_large_natural_parameters(make):
    eta = torch.tensor([[50.0, -50.0, 0.0, 49.0], [-50.0, 50.0, 20.0, -20.0]], requires_grad=True)
    q = make(eta)
    z = q.sample(3)
    for value in (q.log_prob(z), q.entropy(), q.kl_to_prior()):
        assert torch.isfinite(value).all()
    assert (q.entropy() >= 0).all() and (q.kl_to_prior() >= -1e-5).all()
    (q.log_prob(z).sum() + q.kl_to_prior().sum()).backward()
    assert torch.isfinite(eta.grad).all()


def test_entropy_is_bounded_by_the_uniform():
    assert torch.allclose(Bernoulli(torch.zeros(7)).entropy(), torch.tensor(7 * math.log(2)))
    assert torch.allclose(Categorical(torch.zeros(100)).entropy(), torch.tensor(math.log(100)))


def test_refuses_to_enumerate_huge_spaces():
    with pytest.raises(InputError, match="too many"):
        Bernoulli(torch.zeros(50)).enumerate()
    with pytest.raises(InputError, match="groups"):
        Categorical(torch.zeros(7), 2)


# Every method of every family against a direct computation (float64, so a dtype dropped to torch's default fails).
BITS, CATS = Bernoulli(ETA[:, :3]), Categorical(ETA[:, :4], 2)


def test_modes_and_codes_are_the_most_probable_states():
    assert torch.equal(BITS.mode(), (BITS.probs > 0.5).double())
    assert BITS.code().dtype == torch.uint8 and torch.equal(BITS.code(), (BITS.probs > 0.5).to(torch.uint8))
    grouped = CATS.probs  # [5, 2, 2]
    assert torch.equal(CATS.code(), grouped.argmax(-1))
    assert CATS.mode().dtype == torch.float64
    assert torch.equal(CATS.mode(), torch.nn.functional.one_hot(grouped.argmax(-1), 2).double().flatten(-2))
    g = Gaussian(ETA[:, :4])
    assert torch.equal(g.mode(), ETA[:, :2]) and torch.equal(g.code(), ETA[:, :2])
    joint = Joint([("bernoulli", BITS), ("categorical", CATS), ("gaussian", g)])
    assert torch.equal(joint.mode(), torch.cat([BITS.mode(), CATS.mode(), g.mode()], -1))
    assert torch.equal(joint.code(), torch.cat([BITS.code().long(), CATS.code()], -1))
    assert torch.equal(Joint([("bernoulli", BITS), ("gaussian", g)]).code(), BITS.code())


def test_aggregate_is_the_batch_marginal():
    prior = torch.randn(3, dtype=torch.float64)
    bits = Bernoulli(ETA[:, :3], prior_logits=prior).aggregate()
    assert torch.allclose(bits.probs, BITS.probs.mean(0)) and bits.prior_logits is prior
    cats = CATS.aggregate()
    assert cats.groups == 2 and torch.allclose(cats.probs, CATS.probs.mean(0))
    joint = Joint([("bernoulli", BITS), ("categorical", CATS)]).aggregate()
    assert torch.allclose(joint.mean, torch.cat([BITS.probs.mean(0), CATS.mean.mean(0)]))


@pytest.mark.parametrize("q", [BITS, CATS, Categorical(ETA[:, :6], 3), Joint([("c", CATS), ("b", BITS)])],
                         ids=["bernoulli", "categorical-2x2", "categorical-3x2", "joint"])
def test_state_index_is_the_row_in_enumerate(q):
    states = q.enumerate()
    assert states.dtype == torch.float64 and len(states) == q.num_states
    assert torch.equal(q.state_index(states), torch.arange(q.num_states))
    assert torch.equal(q.state_index(states[None].expand(2, -1, -1)), torch.arange(q.num_states).expand(2, -1))


def test_bernoulli_and_categorical_enumerate_in_documented_order():
    assert torch.equal(BITS.enumerate()[[0, 1, 6]], torch.tensor([[0.0, 0, 0], [0, 0, 1], [1, 1, 0]]).double())
    assert torch.equal(CATS.enumerate()[[0, 1, 2]], torch.tensor([[1.0, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]]).double())


def test_joint_enumerates_every_combination_first_block_slowest():
    joint = Joint([("c", CATS), ("b", BITS)])
    states, cats, bits = joint.enumerate(), CATS.enumerate(), BITS.enumerate()
    assert states.shape == (4 * 8, 7)
    k = torch.arange(32)
    assert torch.equal(states, torch.cat([cats[k // 8], bits[k % 8]], -1))
    logq = joint.log_prob(states[:, None])
    assert torch.allclose(torch.logsumexp(logq, 0), torch.zeros(5, dtype=torch.float64))


def test_joint_is_the_sum_and_concatenation_of_its_blocks():
    g = Gaussian(ETA[:, :4])
    joint = Joint([("bernoulli", BITS), ("categorical", CATS), ("gaussian", g)])
    assert joint.dim == 9 and joint.name == "bernoulli+categorical+gaussian" and not joint.discrete
    z = joint.sample(2)
    parts = z[..., :3], z[..., 3:7], z[..., 7:]
    assert torch.allclose(joint.log_prob(z), BITS.log_prob(parts[0]) + CATS.log_prob(parts[1]) + g.log_prob(parts[2]))
    assert torch.allclose(joint.entropy(), BITS.entropy() + CATS.entropy() + g.entropy())
    assert torch.allclose(joint.prior_log_prob(z), BITS.prior_log_prob(parts[0]) + CATS.prior_log_prob(parts[1])
                          + g.prior_log_prob(parts[2]))
    other_bits, other_cats = Bernoulli(ETA[:, 3:]), Categorical(ETA[:, 2:], 2)
    other = Joint([("bernoulli", other_bits), ("categorical", other_cats)])
    discrete = Joint([("bernoulli", BITS), ("categorical", CATS)])
    assert torch.allclose(discrete.kl(other), BITS.kl(other_bits) + CATS.kl(other_cats))
    xi = torch.randn(5, 7, dtype=torch.float64)
    proposal = discrete.proposal(xi)
    assert [name for name, _ in proposal.parts] == ["bernoulli", "categorical"]
    assert torch.equal(proposal.logits, xi) and proposal.parts[1][1].groups == 2


def test_joint_relaxed_sample_is_its_blocks_in_order():
    joint = Joint([("bernoulli", BITS), ("categorical", CATS)])
    torch.manual_seed(3)
    soft, hard = joint.relaxed_sample(2, 0.5)
    torch.manual_seed(3)
    expected = [BITS.relaxed_sample(2, 0.5), CATS.relaxed_sample(2, 0.5)]
    assert soft.shape == hard.shape == (2, 5, 7)
    assert torch.equal(soft, torch.cat([expected[0][0], expected[1][0]], -1))
    assert torch.equal(hard, torch.cat([expected[0][1], expected[1][1]], -1))


def test_join_puts_discrete_and_continuous_states_in_place():
    z_d, z_c = torch.ones(5, 3, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64)
    assert BITS.join(z_d, z_c) is z_d and Gaussian(ETA[:, :4]).join(z_d, z_c) is z_c


def test_continuous_latents_refuse_to_enumerate():
    with pytest.raises(InputError, match="^a Gaussian latent cannot be enumerated$"):
        Gaussian(ETA[:, :4]).enumerate()
    with pytest.raises(InputError, match=r"a latent with a continuous block \(bernoulli\+gaussian\)"):
        Joint([("bernoulli", BITS), ("gaussian", Gaussian(ETA[:, :4]))]).enumerate()


def test_mixture_samples_and_prior_are_the_gaussian_blocks():
    means = torch.randn(2, 2, dtype=torch.float64)
    g = Gaussian(ETA[:, :4])
    q = Mixture(Categorical(ETA[:, 4:]), g, means)
    torch.manual_seed(5)
    z = q.rsample(3)
    torch.manual_seed(5)
    assert z.shape == (3, 5, 2) and torch.equal(z, g.rsample(3))
    each = td.Normal(means, 1.0).log_prob(z[..., None, :]).sum(-1)  # [3, 5, 2]
    assert torch.allclose(q.prior_log_prob(z), torch.logsumexp(each, -1) - math.log(2))


def test_unit_entropies_and_usage_from_posterior_means():
    mean = torch.rand(7, 3, dtype=torch.float64)
    def h(p):
        return -(p * p.log() + (1 - p) * (1 - p).log())
    marginal, conditional = Bernoulli.unit_entropies(mean)
    assert torch.allclose(marginal, h(mean.mean(0))) and torch.allclose(conditional, h(mean).mean(0))
    probs = torch.softmax(torch.randn(7, 2, 3, dtype=torch.float64), -1)
    marginal, conditional = Categorical(torch.zeros(6), 2).unit_entropies(probs.flatten(-2))
    assert torch.allclose(marginal, -(probs.mean(0) * probs.mean(0).log()).sum(-1))
    assert torch.allclose(conditional, -(probs * probs.log()).sum(-1).mean(0))
    rare = torch.tensor([[0.9, 0.1 - 1e-3, 1e-3], [0.9, 0.1 - 1e-3, 1e-3]], dtype=torch.float64)  # 3rd: 0.001 < 0.1/3
    assert Categorical(torch.zeros(3)).usage(rare) == {"used_categories": 2}
    assert Categorical(torch.zeros(6), 2).usage(torch.cat([rare, rare], -1)) == {"used_categories": 4}
    assert BITS.usage(mean) == {}


def test_gaussian_reduces_its_last_axis_only():
    params = torch.randn(2, 5, 6, dtype=torch.float64)
    q, ref = Gaussian(params), td.Normal(params[..., :3], (0.5 * params[..., 3:]).exp())
    assert q.entropy().shape == (2, 5) and torch.allclose(q.entropy(), ref.entropy().sum(-1))
    z = q.sample()
    assert torch.allclose(q.log_prob(z), ref.log_prob(z).sum(-1))


def test_mixture_join_is_the_class_mean_plus_the_offset():
    means = torch.randn(3, 2, dtype=torch.float64)
    q = Mixture(Categorical(torch.zeros(5, 3, dtype=torch.float64)), Gaussian(torch.zeros(5, 4, dtype=torch.float64)),
                means)
    y = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 1, 0]), 3).double()
    u = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(q.join(y, u), means[[2, 0, 1, 1, 0]] + u)


def test_ties_dtypes_and_higher_batch_axes():
    """The mode and code at q = 1/2 are 0 (the documented q(z_i = 1) > 1/2); values keep the parameters' dtype;
    a batch of shape [2, 5] reduces the latent axis only."""
    half = Bernoulli(torch.zeros(2, 3, dtype=torch.float64))
    assert torch.equal(half.mode(), torch.zeros(2, 3, dtype=torch.float64)) and half.mode().dtype == torch.float64
    assert torch.equal(half.code(), torch.zeros(2, 3, dtype=torch.uint8))
    assert BITS.mode().dtype == torch.float64
    a, b = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    kl = Bernoulli(a).kl(Bernoulli(b))
    assert kl.shape == (2, 5)
    assert torch.allclose(kl, td.kl_divergence(td.Bernoulli(logits=a), td.Bernoulli(logits=b)).sum(-1))
    joint = Joint([("bernoulli", Bernoulli(a)), ("gaussian", Gaussian(torch.randn(2, 5, 4, dtype=torch.float64)))])
    assert joint.mode().shape == (2, 5, 5)
    states = Joint([("c", CATS), ("b", BITS)]).enumerate()
    assert Joint([("c", CATS), ("b", BITS)]).state_index(states).dtype == torch.long


def test_proposal_and_aggregate_keep_the_learned_prior():
    """q_I and the batch's marginal are other members of q's family under the same prior p(z)."""
    prior = torch.randn(3, dtype=torch.float64)
    bits = Bernoulli(ETA[:, :3], prior_logits=prior)
    z = bits.sample(2)
    assert torch.allclose(bits.proposal(torch.zeros(3, dtype=torch.float64)).prior_log_prob(z), bits.prior_log_prob(z))
    cat_prior = torch.randn(4, dtype=torch.float64)
    cats = Categorical(ETA[:, :4], 2, prior_logits=cat_prior)
    marginal = cats.probs.mean(0)  # [2, 2]
    expected = (marginal * (marginal.log() - torch.log_softmax(cat_prior.view(2, 2), -1))).sum()
    assert torch.allclose(cats.aggregate().kl_to_prior(), expected)


def test_prior_samples_have_the_prior_distribution_and_the_posterior_dtype():
    torch.manual_seed(0)
    bits = Bernoulli(torch.zeros(4, dtype=torch.float64)).prior_sample(20000)
    assert bits.dtype == torch.float64 and set(bits.unique().tolist()) == {0.0, 1.0}
    assert ((bits.mean(0) - 0.5).abs() < 5 * 0.5 / 20000**0.5).all()
    learned = Bernoulli(torch.zeros(4, dtype=torch.float64), prior_logits=torch.zeros(4)).prior_sample(3)
    assert learned.dtype == torch.float64
    means = 100 * torch.eye(3, 2, dtype=torch.float64)
    q = Mixture(Categorical(torch.zeros(3, dtype=torch.float64)), Gaussian(torch.zeros(4, dtype=torch.float64)), means)
    z = q.prior_sample(4000)
    y = torch.cdist(z, means).argmin(-1)
    assert z.shape == (4000, 2) and z.dtype == torch.float64 and (y.bincount(minlength=3) > 1000).all()
    offsets = z - means[y]  # independent N(0, I) draws, one per sample
    assert ((offsets.mean(0)).abs() < 0.1).all() and ((offsets.std(0) - 1).abs() < 0.1).all()


def test_mixture_join_reads_the_means_in_the_states_dtype():
    means = torch.randn(3, 2)  # float32, as a module's parameter
    q = Mixture(Categorical(torch.zeros(5, 3)), Gaussian(torch.zeros(5, 4)), means)
    y = torch.eye(3, dtype=torch.float64)
    assert torch.allclose(q.join(y, torch.zeros(3, 2, dtype=torch.float64)), means.double())


def test_usage_threshold_is_strict():
    at = torch.tensor([[0.975, 0.025, 0.0, 0.0]], dtype=torch.float64)  # 0.025 is exactly a tenth of 1/4
    assert Categorical(torch.zeros(4)).usage(at) == {"used_categories": 1}


def test_conversion_refuses_more_than_two_batch_axes():
    with pytest.raises(InputError, match=r"^a OneHotCategorical posterior has batch shape \[B\] or \[B, G\], "
                                         r"got \[2, 3, 4\]$"):
        as_family(td.OneHotCategorical(logits=torch.zeros(2, 3, 4, 5)))


def test_joint_join_places_each_block_in_order_and_broadcasts():
    g = Gaussian(torch.zeros(4, 4, dtype=torch.float64))
    joint = Joint([("categorical", Categorical(torch.zeros(4, 4, dtype=torch.float64), 2)), ("gaussian", g),
                   ("bernoulli", Bernoulli(torch.zeros(4, 3, dtype=torch.float64)))])
    z_d = torch.arange(7.0, dtype=torch.float64).expand(5, 1, 7)  # [S, 1, cat 4 + bits 3]
    z_c = -torch.arange(1.0, 9.0, dtype=torch.float64).view(4, 2)  # [B, gaussian 2]
    z = joint.join(z_d, z_c)
    assert z.shape == (5, 4, 9)
    assert torch.equal(z[..., :4], z_d[..., :4].expand(5, 4, 4))
    assert torch.equal(z[..., 6:], z_d[..., 4:].expand(5, 4, 3))
    assert torch.equal(z[..., 4:6], z_c.expand(5, 4, 2))


def test_estimand_hands_over_the_discrete_blocks_with_one_reparameterised_draw():
    """A hybrid's estimand is (q_d, z_d -> f(join(z_d, z_c))) with one z_c = mu + sigma eps per data point, shared
    by every z_d; the gradient reaches the Gaussian's parameters through z_c."""
    params = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g, cats = Gaussian(params), Categorical(torch.zeros(3, 3, dtype=torch.float64))
    joint = Joint([("categorical", cats), ("gaussian", g)])
    seen = []
    torch.manual_seed(1)
    q_d, f = joint.estimand(lambda z: seen.append(z) or z.sum(-1))
    torch.manual_seed(1)
    z_c = g.rsample()
    assert q_d is cats
    value = f(torch.eye(3, dtype=torch.float64)[:, None])  # three states [3, 1, 3] for the batch of 3
    assert torch.allclose(seen[0], joint.join(torch.eye(3, dtype=torch.float64)[:, None], z_c))
    value.sum().backward()
    assert params.grad is not None and params.grad.abs().sum() > 0
    discrete = Joint([("categorical", cats), ("bernoulli", BITS)])
    assert discrete.estimand(sum)[0] is discrete
    continuous = Joint([("gaussian", g)])  # no discrete block: the estimator reparameterises the whole of q
    assert continuous.estimand(sum)[0] is continuous


def test_block_sizes_default_to_one_group():
    assert (Categorical.param_dim(5), Categorical.dim_of(5), Categorical.states_of(5)) == (5, 5, 5)
    assert Categorical.states_of(3, 2) == 9 and Categorical.states_of(2, 3) == 8
    assert Bernoulli.states_of(5) == 32 and Bernoulli.param_dim(5) == 5 and Gaussian.param_dim(5) == 10
    assert Categorical.from_params(torch.zeros(1, 6)).groups == 1
    assert Gaussian.dim_of(4) == 4 and Gaussian.states_of(4) is None
    with pytest.raises(ValueError, match="^a gaussian block has no learned prior$"):
        Gaussian.from_params(torch.zeros(1, 4), prior_logits=torch.zeros(2))


def test_encodings_are_probabilities_or_means():
    g = Gaussian(ETA[:, :4])
    assert torch.equal(g.encoding(), ETA[:, :2]) and torch.equal(BITS.encoding(), BITS.probs)
    both = Joint([("bernoulli", BITS), ("categorical", CATS)])
    assert torch.equal(both.encoding(), torch.cat([BITS.probs, CATS.mean], -1))
    assert torch.equal(Joint([("bernoulli", BITS), ("gaussian", g)]).encoding(), BITS.probs)
    code = Joint([("bernoulli", BITS), ("gaussian", g)]).code()
    assert code.dtype == torch.uint8 and torch.equal(code, BITS.code())
    deep = Joint([("bernoulli", Bernoulli(torch.randn(2, 5, 3))),
                  ("categorical", Categorical(torch.randn(2, 5, 4), 2))])
    assert deep.code().shape == (2, 5, 5) and deep.prior_sample((2, 3)).shape == (2, 3, 7)


def test_one_hot_states_keep_every_class_when_one_dominates():
    peaked = Categorical(torch.tensor([[9.0, 0.0, 0.0], [9.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(peaked.mode(), torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=torch.float64))
    soft, hard = peaked.relaxed_sample(1, 0.5)
    assert soft.shape == hard.shape == (1, 2, 3)


def test_categorical_proposal_and_prior_samples():
    prior = torch.randn(4, dtype=torch.float64)
    cats = Categorical(ETA[:, :4], 2, prior_logits=prior)
    z = cats.sample(2)
    assert torch.allclose(cats.proposal(torch.zeros(4, dtype=torch.float64)).prior_log_prob(z), cats.prior_log_prob(z))
    torch.manual_seed(0)
    uniform = Categorical(torch.zeros(6, dtype=torch.float64), 2).prior_sample(6000)
    assert uniform.dtype == torch.float64 and uniform.shape == (6000, 6)
    assert ((uniform.mean(0) - 1 / 3).abs() < 5 * (2 / 9 / 6000) ** 0.5).all()  # every class drawn 1/3 of the time
    learned = Categorical(torch.zeros(6, dtype=torch.float64), 2, prior_logits=torch.zeros(6)).prior_sample(2)
    assert learned.dtype == torch.float64
    assert Gaussian(ETA[:, :4]).prior_sample(3).dtype == torch.float64


def test_mixture_kl_over_a_batch_of_batches():
    means = torch.randn(3, 2, dtype=torch.float64)
    logits, params = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    q = Mixture(Categorical(logits), Gaussian(params), means)
    flat = Mixture(Categorical(logits.reshape(10, 3)), Gaussian(params.reshape(10, 4)), means)
    for name, kl in q.kl_parts().items():
        assert kl.shape == (2, 5) and torch.allclose(kl.reshape(10), flat.kl_parts()[name])


def test_a_single_bit_or_dimension():
    one = Bernoulli(torch.randn(5, 1, dtype=torch.float64))
    z = one.sample(3)
    assert one.log_prob(z).shape == (3, 5) and one.log_prob(z[0]).shape == (5,)
    assert torch.allclose(one.log_prob(z), td.Bernoulli(logits=one.logits).log_prob(z).sum(-1))


def test_enumerates_up_to_the_limit():
    assert len(Bernoulli(torch.zeros(20)).enumerate()) == 2**20  # MAX_ENUMERATE states: the largest allowed


def test_log_prob_broadcasts_states_against_any_batch():
    """Shared states ``[S, 1, c]`` against a batch of 2, states ``[S, 2, c]`` of each row, and a batch of shape
    ``[1, 5]``: each against torch's log-probabilities."""
    for logits, z in ((torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 2, (3, 1, 4)).double()),
                      (torch.randn(2, 4, dtype=torch.float64), torch.randint(0, 2, (3, 2, 4)).double()),
                      (torch.randn(1, 5, 4, dtype=torch.float64), torch.randint(0, 2, (3, 1, 4)).double())):
        expected = td.Bernoulli(logits=logits).log_prob(z).sum(-1)
        assert torch.allclose(Bernoulli(logits).log_prob(z), expected), (logits.shape, z.shape)


def test_estimand_draws_every_continuous_block_of_a_batch_of_batches():
    g1, g2 = Gaussian(torch.randn(2, 3, 4, dtype=torch.float64)), Gaussian(torch.randn(2, 3, 2, dtype=torch.float64))
    joint = Joint([("g1", g1), ("categorical", Categorical(torch.zeros(2, 3, 3, dtype=torch.float64))), ("g2", g2)])
    seen = []
    torch.manual_seed(2)
    _, f = joint.estimand(seen.append)
    torch.manual_seed(2)
    z1, z2 = g1.rsample(), g2.rsample()
    f(torch.eye(3, dtype=torch.float64))
    assert torch.equal(seen[0], torch.cat([z1, torch.eye(3, dtype=torch.float64).expand(2, 3, 3), z2], -1))
