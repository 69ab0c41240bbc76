"""LatentSpace: parsing ``--latent``, its sizes and state counts, the prior modules and the posterior it builds."""
import pytest
import torch

from discvae.distributions import Bernoulli, Categorical, Gaussian, Joint, Mixture
from discvae.errors import InputError
from discvae.latents import DEFAULT_SIZE, MAX_WIDTH, LatentSpace, LearnedPrior, MixturePrior


@pytest.mark.parametrize("spec, size, groups, text, param_dim, dim, states", [
    ("bernoulli", None, 1, f"bernoulli:{DEFAULT_SIZE}", 50, 50, 2**50),
    ("bernoulli", 7, 1, "bernoulli:7", 7, 7, 128),
    ("categorical", 10, 3, "categorical:10x3", 30, 30, 1000),
    ("gaussian", 4, 1, "gaussian:4", 8, 4, None),
    ("categorical:10x2+gaussian:3", None, 1, "categorical:10x2+gaussian:3", 26, 23, None),
    ("bernoulli:3+categorical:4", None, 1, "bernoulli:3+categorical:4", 7, 7, 32),
])
def test_sizes_and_states(spec, size, groups, text, param_dim, dim, states):
    space = LatentSpace.parse(spec, size, groups)
    assert (str(space), space.param_dim, space.dim, space.num_states) == (text, param_dim, dim, states)
    assert space.discrete == (states is not None) and space.prior == "standard"


def test_the_code_block_is_the_only_discrete_block():
    assert LatentSpace.parse("categorical:10x2+gaussian:3").code_block.groups == 2
    assert LatentSpace.parse("bernoulli", 5).code_block.family is Bernoulli
    assert LatentSpace.parse("gaussian", 5).code_block is None
    assert LatentSpace.parse("bernoulli:3+categorical:4").code_block is None


def test_the_mixture_decodes_z_alone_and_holds_its_means():
    space = LatentSpace.parse("categorical:4+gaussian:3", prior="mixture")
    assert (space.param_dim, space.dim, space.num_states) == (4 + 6, 3, None)
    prior = space.prior_module()
    assert isinstance(prior, MixturePrior) and prior.means.shape == (4, 3) and prior.means.abs().sum() > 0
    q = space.posterior(torch.zeros(2, 10), prior)
    assert isinstance(q, Mixture) and q.means is prior.means and q.sample().shape == (2, 3)


def test_the_learned_prior_covers_the_discrete_blocks_from_uniform():
    space = LatentSpace.parse("bernoulli:4+categorical:3x2+gaussian:2", prior="learned")
    prior = space.prior_module()
    assert isinstance(prior, LearnedPrior) and set(prior.logits) == {"bernoulli", "categorical"}
    assert prior.logits["bernoulli"].shape == (4,) and prior.logits["categorical"].shape == (6,)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in prior.logits.values())
    q = space.posterior(torch.zeros(2, space.param_dim), prior)
    (_, bits), (_, cats), (_, gauss) = q.parts
    assert bits.prior_logits is prior.logits["bernoulli"] and cats.prior_logits is prior.logits["categorical"]
    assert cats.groups == 2 and isinstance(gauss, Gaussian)
    assert LatentSpace.parse("bernoulli", 3).prior_module() is None


def test_posterior_splits_the_parameters_among_the_blocks():
    space = LatentSpace.parse("bernoulli:2+categorical:3x2")
    params = torch.arange(8.0)[None]
    q = space.posterior(params)
    assert isinstance(q, Joint) and [name for name, _ in q.parts] == ["bernoulli", "categorical"]
    assert torch.equal(q.parts[0][1].logits, params[:, :2]) and torch.equal(q.parts[1][1].logits, params[:, 2:])
    batched = space.posterior(torch.arange(48.0).view(2, 3, 8))  # [..., param_dim]: the blocks split the last axis
    assert batched.parts[0][1].logits.shape == (2, 3, 2) and batched.parts[1][1].logits.shape == (2, 3, 6)
    assert torch.equal(batched.parts[1][1].logits[1, 2], torch.arange(42.0, 48.0))
    single = LatentSpace.parse("categorical", 3, 2).posterior(torch.zeros(1, 6))
    assert isinstance(single, Categorical) and single.groups == 2
    with pytest.raises(ValueError, match=r"^a latent with the learned prior needs that prior's module \(VAE.prior\)$"):
        LatentSpace.parse("bernoulli", 3, prior="learned").posterior(torch.zeros(1, 3))


@pytest.mark.parametrize("args, kwargs, message, params", [
    (("bernoulli", 3), {"prior": "vamp"},
     "unknown prior 'vamp'; choose one of standard, learned, mixture, mixture-var", ("prior",)),
    ((3,), {}, "latent must be a string such as bernoulli or categorical:10+gaussian:10, not 3", ()),
    (("categorical:10+gaussian:4", 10), {}, "latent 'categorical:10+gaussian:4' gives its own sizes; leave out "
     "latent_dim and groups", ("latent_dim", "groups")),
    (("categorical:10", None, 2), {}, "latent 'categorical:10' gives its own sizes; leave out latent_dim and groups",
     ("latent_dim", "groups")),
    (("beta:3",), {}, "latent block 'beta:3' is not one of bernoulli, categorical, gaussian, each with its size or "
     "without (e.g. categorical:10+gaussian:10, bernoulli+gaussian:16)", ("latent",)),
    (("bernoulli+gauss:2",), {}, "latent block 'gauss:2' is not one of bernoulli, categorical, gaussian, "
     "each with its size or without (e.g. categorical:10+gaussian:10, bernoulli+gaussian:16)", ("latent",)),
    (("bernoulli+gaussian:2", 3, 2), {}, "groups applies to a categorical latent, not to a bernoulli one",
     ("groups",)),  # the unsized block takes the groups too
    (("bernoulli", 3, 2), {}, "groups applies to a categorical latent, not to a bernoulli one", ("groups",)),
    (("categorical", 1), {}, "latent block categorical:1 is too small: at least 2 classes and 1 group",
     ("latent_dim",)),
    (("categorical", 3, 0), {}, "latent block categorical:3 is too small: at least 2 classes and 1 group",
     ("latent_dim",)),
    (("bernoulli", 0), {}, "latent block bernoulli:0 is too small: at least 1 dimension and 1 group",
     ("latent_dim",)),
    (("bernoulli", MAX_WIDTH + 1), {}, f"latent block bernoulli:{MAX_WIDTH + 1} is too large: at most {MAX_WIDTH} "
     "coordinates", ("latent_dim",)),
    (("categorical:2x1073741824",), {}, "latent block categorical:2x1073741824 is too large: at most "
     f"{MAX_WIDTH} coordinates", ("latent_dim",)),  # classes x groups = 2^31 coordinates
    (("bernoulli:3+bernoulli:4",), {}, "latent 'bernoulli:3+bernoulli:4' repeats a family; give each family once "
     "(a categorical with several groups is categorical:CxG)", ("latent",)),
    (("categorical:3x2+gaussian:2",), {"prior": "mixture"}, "prior mixture needs a latent categorical:C+gaussian:K "
     "(one group), not 'categorical:3x2+gaussian:2'", ("prior",)),
    (("gaussian", 3), {"prior": "learned"}, "prior learned needs a latent with a discrete block (bits or classes), "
     "not 'gaussian'", ("prior",)),
])
def test_bad_latents_are_refused_in_full(args, kwargs, message, params):
    with pytest.raises(InputError) as caught:
        LatentSpace.parse(*args, **kwargs)
    assert str(caught.value) == message and caught.value.params == params


def test_a_block_without_its_size_takes_latent_dim_and_groups():
    assert str(LatentSpace.parse("bernoulli+gaussian:16", 32)) == "bernoulli:32+gaussian:16"
    assert str(LatentSpace.parse("bernoulli+gaussian:16")) == f"bernoulli:{DEFAULT_SIZE}+gaussian:16"
    assert str(LatentSpace.parse("categorical+gaussian:4", 10, 3)) == "categorical:10x3+gaussian:4"
    assert str(LatentSpace.parse("bernoulli+gaussian", 8)) == "bernoulli:8+gaussian:8"
    assert LatentSpace.sizes_itself("bernoulli:8+gaussian:2") and LatentSpace.sizes_itself("categorical:10")
    assert not LatentSpace.sizes_itself("bernoulli+gaussian:2") and not LatentSpace.sizes_itself("bernoulli")


def test_sizes_at_the_limits_are_accepted():
    assert LatentSpace.parse("categorical", 2).num_states == 2
    assert LatentSpace.parse("bernoulli", 1).num_states == 2
    assert LatentSpace.parse("bernoulli", MAX_WIDTH).param_dim == MAX_WIDTH
    assert LatentSpace.parse("categorical:3x2+gaussian:1").dim == 7
