"""Architectures of Table I: shapes for 28x28 and 8x8 inputs, every latent family."""
import pytest
import torch

from discvae import Config, Dataset, InputError, build_model
from discvae.estimators import disarm, make_estimator
from discvae.latents import MAX_WIDTH, LatentSpace
from discvae.models import VAE, Head, architecture_options, at_least_fp32
from discvae.training import model_for


@pytest.mark.parametrize("arch,shape", [("fc", (1, 28, 28)), ("fc", (1, 8, 8)), ("cnn", (1, 28, 28)),
                                        ("cnn", (1, 8, 8)), ("cnn", (3, 13, 10))])
@pytest.mark.parametrize("latent,dim,groups,param_dim,z_dim", [("bernoulli", 50, 1, 50, 50),
                                                               ("categorical", 10, 20, 200, 200),
                                                               ("gaussian", 8, 1, 16, 8)])
def test_shapes(arch, shape, latent, dim, groups, param_dim, z_dim):
    model = build_model(arch, shape, latent, dim, groups)
    x = torch.rand(5, *shape)
    q = model.posterior(x)
    assert q.sample(3).shape == (3, 5, z_dim)
    assert model.encoder(x).shape == (5, param_dim)
    out = model.decode(q.sample(3))
    assert out.shape == (3, 5, torch.Size(shape).numel())
    assert model.log_likelihood(x, q.sample(2)).shape == (2, 5)
    terms = model(x, "reparam" if latent == "gaussian" else "importance", num_samples=2)
    assert terms.loss.shape == () and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_layers_of_table_1():
    model = build_model("cnn", (1, 28, 28), "bernoulli", 50)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(32, (3, 3), (2, 2)), (64, (3, 3), (2, 2)),
                                                                           (128, (3, 3), (2, 2))]
    deconvs = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [d.out_channels for d in deconvs] == [64, 64, 32, 1]
    h = torch.rand(2, 50)
    sizes = []
    for m in model.decoder:
        h = m(h)
        if isinstance(m, torch.nn.ConvTranspose2d):
            sizes.append(tuple(h.shape[-2:]))
    assert sizes == [(4, 4), (7, 7), (14, 14), (28, 28)]


LAYERS = {  # each architecture's layers in order (docstrings of discvae.models; Table I for fc and cnn)
    "fc": (["Flatten", "Linear", "ReLU", "Head"], ["Linear", "ReLU", "Linear"]),
    "linear": (["Flatten", "Head"], ["Linear"]),
    "nonlinear": (["Flatten", "Linear", "LeakyReLU", "Linear", "LeakyReLU", "Head"],
                  ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]),
    "cnn": (["Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "ReLU", "Flatten", "Head"],
            ["Linear", "ReLU", "_Unflatten", *["ConvTranspose2d", "ReLU"] * 3, "ConvTranspose2d", "Flatten"]),
}


@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_every_architecture_has_its_layers_in_order(arch):
    """A ReLU after every hidden layer and none after the last, and the encoder's last layer a ``Head`` (an
    ``nn.Linear`` that stays fp32 under bf16 autocast)."""
    model = build_model(arch, (1, 28, 28), "bernoulli", 50)
    for net, names in zip((model.encoder, model.decoder), LAYERS[arch], strict=True):
        layers = net if isinstance(net, torch.nn.Sequential) else [net]
        assert [type(layer).__name__ for layer in layers] == names


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "cnn", "input_shape": (784,)}, "the cnn architecture needs images [C, H, W], got data of shape (784,)"),
    ({"arch": "mlp"}, "unknown architecture 'mlp'; choose one of fc, cnn, linear, nonlinear"),
    ({"init": "xavier"}, "unknown init 'xavier'; choose one of torch, he")])
def test_refusals_name_the_choices_in_one_line(kwargs, message):
    with pytest.raises(InputError) as caught:
        build_model(**{"arch": "fc", "input_shape": (1, 8, 8), "latent": "bernoulli", "latent_dim": 4, **kwargs})
    assert str(caught.value) == message


def test_fc_layers_of_table_1():
    model = build_model("fc", (1, 28, 28), "categorical", 100)
    widths = [(m.in_features, m.out_features) for m in [*model.encoder, *model.decoder] if hasattr(m, "in_features")]
    assert widths == [(784, 1024), (1024, 100), (100, 1024), (1024, 784)]


def test_shared_state_decoding_matches_per_row():
    """The likelihood's matmul path for z shared by the batch equals decoding it for every row."""
    for lik in ("bernoulli", "gaussian"):
        model = build_model("fc", (1, 8, 8), "categorical", 5, likelihood=lik).double()
        x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
        z = torch.eye(5, dtype=torch.float64)[:, None, :]
        assert torch.allclose(model.log_likelihood(x, z), model.log_likelihood(x, z.expand(5, 4, 5)))


@pytest.mark.parametrize("kwargs,match", [({"latent": "poisson"}, "latent"),  # unknown arch, init: in full below
                                          ({"latent_dim": 0}, "too small"), ({"likelihood": "beta"}, "likelihood"),
                                          ({"arch": "cnn", "hidden": 64}, "the cnn architecture has no hidden width"),
                                          ({"arch": "linear", "hidden": 64}, "the linear architecture has no hidden"),
                                          ({"hidden": 0}, "hidden must be at least 1"),
                                          ({"slope": 0.3}, "the fc architecture has no LeakyReLU slope to set "
                                                           r"\(nonlinear has\)"),
                                          ({"arch": "nonlinear", "slope": 1.0}, "slope must be at least 0 and below 1"),
                                          ({"arch": "nonlinear", "slope": -0.1}, "slope must be at least 0")])
def test_bad_model_arguments(kwargs, match):
    args = {"arch": "fc", "input_shape": (1, 8, 8), **kwargs}
    with pytest.raises(InputError, match=match):
        build_model(**args)


@pytest.mark.parametrize("arch,hidden", [("linear", []), ("nonlinear", [200, 200])])
def test_benchmark_architectures_of_the_estimator_literature(arch, hidden):
    """The 200-bit 'linear' (784-200 / 200-784) and 'nonlinear' (two hidden layers of 200, LeakyReLU) models."""
    model = build_model(arch, (1, 28, 28), "bernoulli", 200)
    for net, n_in, n_out in ((model.encoder, 784, 200), (model.decoder, 200, 784)):
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        sizes = [n_in, *hidden, n_out]
        assert [(m.in_features, m.out_features) for m in linears] == list(zip(sizes[:-1], sizes[1:], strict=True))
        assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == len(hidden)
    x = torch.rand(5, 1, 28, 28)
    assert model.posterior(x).logits.shape == (5, 200)
    terms = model(x, "disarm", num_samples=2)
    terms.loss.backward()
    assert torch.isfinite(terms.loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch,layers", [("fc", 1), ("nonlinear", 2)])
def test_hidden_sets_the_width_of_every_hidden_layer(arch, layers):
    model = build_model(arch, (1, 8, 8), "bernoulli", 6, hidden=17)
    for net, n_in, n_out in ((model.encoder, 64, 6), (model.decoder, 6, 64)):
        sizes = [n_in, *[17] * layers, n_out]
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == list(zip(sizes[:-1], sizes[1:], strict=True))


def test_he_init_draws_weights_with_variance_2_over_fan_in():
    """Every layer's weights have sample variance 2 / fan_in within 5 standard errors (the sample variance of n
    normal draws has relative standard error sqrt(2 / n)); biases are zero."""
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), "bernoulli", 50, init="he")
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(layers) == 9  # 3 conv + FC, FC + 4 transposed conv
    for layer in layers:
        w = layer.weight.detach()
        fan_in = torch.nn.init._calculate_fan_in_and_fan_out(w)[0]
        target = 2 / fan_in
        assert abs(w.var().item() / target - 1) < 5 * (2 / w.numel()) ** 0.5, layer
        assert not layer.bias.any()


def test_torch_init_is_pytorchs_default():
    torch.manual_seed(3)
    default = build_model("fc", (1, 8, 8), "bernoulli", 5)
    torch.manual_seed(3)
    explicit = build_model("fc", (1, 8, 8), "bernoulli", 5, init="torch")
    for a, b in zip(default.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(a, b)
    bound = 1 / 64 ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    assert default.encoder[1].weight.abs().max() <= bound and default.encoder[1].bias.any()


def test_the_nonlinear_slope_is_a_setting():
    """--slope reaches every LeakyReLU of the nonlinear model (the DisARM / RODEO code's 0.3); unset, ARM's 0.2."""
    data = Dataset("tiny", torch.rand(4, 1, 28, 28), torch.zeros(4), torch.rand(2, 1, 28, 28), torch.zeros(2))
    for slope, want in ((None, 0.2), (0.3, 0.3)):
        model = model_for(Config(arch="nonlinear", latent_dim=200, slope=slope).check(), data)
        slopes = [m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
        assert slopes == [want] * 4


def test_the_values_logged_of_a_batch_are_named_and_detached():
    """``Terms.values`` is what metrics.csv logs: the three terms; a hybrid's KL per block (one block has none:
    it is ``kl``); the consistency term with a view. Values only, no gradient; each equal to its term."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8).bernoulli()
    bits = build_model("fc", (1, 8, 8), "bernoulli", 4, hidden=16)(x, "exact")
    assert list(bits.values()) == ["neg_elbo", "expected_ll", "kl"]
    hybrid = build_model("fc", (1, 8, 8), "categorical:4+gaussian:2", hidden=16)(x, "exact", view=x.flip(-1))
    values = hybrid.values()
    assert list(values) == ["neg_elbo", "expected_ll", "kl", "kl_categorical", "kl_gaussian", "consistency"]
    assert [values[k] for k in ("neg_elbo", "expected_ll", "kl")] == [hybrid.neg_elbo, hybrid.expected_ll, hybrid.kl]
    assert torch.equal(values["kl_categorical"], hybrid.kl_blocks["categorical"])
    assert torch.equal(values["consistency"], hybrid.consistency) and hybrid.consistency > 0
    assert not any(v.requires_grad for v in values.values())
    assert hybrid.kl_blocks["gaussian"].requires_grad and hybrid.consistency.requires_grad


@pytest.mark.parametrize("arch, options, message, param", [
    ("cnn", {"hidden": 64}, "the cnn architecture has no hidden width to set (fc and nonlinear have)", "hidden"),
    ("fc", {"slope": 0.3}, "the fc architecture has no LeakyReLU slope to set (nonlinear has)", "slope"),
    ("fc", {"hidden": 0}, f"hidden must be at least 1 and at most {MAX_WIDTH}, got 0", "hidden"),
    ("fc", {"hidden": MAX_WIDTH + 1}, f"hidden must be at least 1 and at most {MAX_WIDTH}, got {MAX_WIDTH + 1}",
     "hidden"),
    ("nonlinear", {"slope": 1.0}, "slope must be at least 0 and below 1, got 1.0", "slope"),
    ("nonlinear", {"slope": -0.1}, "slope must be at least 0 and below 1, got -0.1", "slope")])
def test_architecture_options_refused_in_full_with_the_option_named(arch, options, message, param):
    with pytest.raises(InputError) as caught:
        architecture_options(arch, **options)
    assert str(caught.value) == message and caught.value.params == (param,)


def test_architecture_options_at_their_limits_are_accepted():
    assert architecture_options("fc") == {}
    for hidden in (1, MAX_WIDTH):
        assert architecture_options("nonlinear", hidden=hidden, slope=0.0) == {"hidden": hidden, "slope": 0.0}


def test_estimator_options_reach_the_estimator_by_name_or_as_a_value():
    """``model(x, estimator, **options)``: the options (here DisARM's 6 samples, 3 antithetic pairs, against 2 by
    default) reach the estimator whether it is named or passed as a value; seen as the z decoded, 6 per image."""
    model = build_model("fc", (1, 8, 8), "bernoulli", 4, hidden=16)
    decoded = []
    model.decoder.register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    x = torch.rand(3, 1, 8, 8).bernoulli()
    for estimator in ("disarm", make_estimator("disarm"), disarm):
        decoded.clear()
        model(x, estimator, num_samples=6)
        assert decoded == [6 * 3], estimator
    decoded.clear()
    model(x, "disarm")
    assert decoded == [2 * 3]


def test_the_head_stays_fp32_under_bf16_autocast():
    """The encoder's last layer computes eta in fp32 even when autocast runs the rest in bf16 (``Head``), and
    ``at_least_fp32`` raises bf16 to fp32 and leaves fp32 and fp64 as they are."""
    for dtype, promoted in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                            (torch.float64, torch.float64)):
        assert at_least_fp32(torch.ones(2, dtype=dtype)).dtype == promoted
    head, hidden = Head(4, 3), torch.rand(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.Linear(4, 3)(hidden).dtype == torch.bfloat16  # what the head is kept from
        assert head(hidden).dtype == torch.float32 and head(hidden.bfloat16()).dtype == torch.float32


def test_a_vae_takes_its_latent_as_a_space_or_a_string_and_names_the_likelihoods():
    """``VAE(encoder, decoder, latent)``: ``latent`` a ``LatentSpace`` or the string it parses from."""
    encoder, decoder = torch.nn.Linear(64, 4), torch.nn.Linear(4, 64)
    assert VAE(encoder, decoder, "categorical:4").space == LatentSpace.parse("categorical:4")
    space = LatentSpace.parse("bernoulli", 4)
    assert VAE(encoder, decoder, space).space is space
    with pytest.raises(InputError) as caught:
        VAE(encoder, decoder, space, likelihood="beta")
    assert str(caught.value) == "unknown likelihood 'beta'; choose one of bernoulli, gaussian"
