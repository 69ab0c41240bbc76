"""Seeds trained side by side with stacked weights (``discvae.stacked``) train as each seed alone, write normal runs,
and resume bit for bit."""
import dataclasses

import pytest
import torch

from discvae import Config, Dataset, InputError, load_dataset, load_run, train
from discvae.distributions import sampling
from discvae.runs import read_csv
from discvae.stacked import RunStreams, train_stacked

# stacked and solo runs agree to float32 rounding of the batched matrix products (measured: 0 on these models)
TOLERANCE = 1e-5


def digits(n_train: int = 256, n_test: int = 64) -> Dataset:
    data = load_dataset("digits")
    return Dataset(data.name, data.x_train[:n_train], None, data.x_test[:n_test], None)


def base(tmp_path, **more) -> Config:
    settings = dict(dataset="digits", arch="fc", hidden=32, latent_dim=8, binarize="dynamic", epochs=2,
                    batch_size=64, lr=3e-3, grad_var_every=2, grad_var_repeats=4, device="cpu",
                    out=str(tmp_path / "unused"))
    return Config(**{**settings, **more})


def stack_of(cfg: Config, tmp_path, seeds, name="stack"):
    return [dataclasses.replace(cfg, seed=s, out=str(tmp_path / name / f"seed-{s}")) for s in seeds]


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("settings", [
    dict(estimator="disarm", estimator_options={"num_samples": 2}, prior="learned"),  # uniform draws
    dict(estimator="importance", estimator_options={"num_samples": 2, "baseline": "loo"}, latent="categorical"),
], ids=["disarm-bits-learned-prior", "importance-categorical"])
def test_each_stacked_run_trains_as_its_seed_alone(tmp_path, settings):
    data, cfg = digits(), base(tmp_path, **settings)
    stacked = train_stacked(stack_of(cfg, tmp_path, [3, 4, 5]), data=data)
    for state, seed in zip(stacked, [3, 4, 5], strict=True):
        alone = train(dataclasses.replace(cfg, seed=seed, out=str(tmp_path / f"alone-{seed}")), progress=False,
                      data=data)
        assert state.step == alone.step == 8
        assert torch.allclose(weights(state.model), weights(alone.model), rtol=0, atol=TOLERANCE)
        rows = read_csv(tmp_path / "stack" / f"seed-{seed}" / "metrics.csv")
        for mine, theirs in zip(rows, read_csv(tmp_path / f"alone-{seed}" / "metrics.csv"), strict=True):
            for key in ("train_neg_elbo", "train_kl", "test_neg_elbo", "grad_encoder_var"):
                if key in theirs and theirs[key] == theirs[key]:
                    assert mine[key] == pytest.approx(theirs[key], rel=TOLERANCE), (seed, key)
    # the seeds differ from one another: each drew its own numbers
    assert not torch.allclose(weights(stacked[0].model), weights(stacked[1].model))


def test_a_stack_resumes_bit_for_bit_and_each_run_is_a_normal_run(tmp_path):
    data = digits()
    cfg = base(tmp_path, estimator="disarm", estimator_options={"num_samples": 2}, epochs=3)
    full = train_stacked(stack_of(cfg, tmp_path, [1, 2], "full"), data=data)
    cut = stack_of(dataclasses.replace(cfg, epochs=1), tmp_path, [1, 2], "cut")
    train_stacked(cut, data=data)
    resumed = train_stacked([dataclasses.replace(c, epochs=3) for c in cut], resume=True, data=data)
    for a, b in zip(full, resumed, strict=True):
        assert torch.equal(weights(a.model), weights(b.model))
        assert a.history[-1]["test_neg_elbo"] == b.history[-1]["test_neg_elbo"]
    run = tmp_path / "cut" / "seed-2"
    saved, model, _ = load_run(run)
    assert saved.seed == 2 and torch.equal(weights(model), weights(resumed[1].model))
    alone = train(dataclasses.replace(cfg, seed=2, epochs=4, out=str(run)), resume=True, progress=False, data=data)
    assert [row["epoch"] for row in alone.history] == [1, 2, 3, 4]


@pytest.mark.parametrize("change, match", [
    (lambda c, i: dataclasses.replace(c, lr=c.lr * (1 + i)), "not in lr"),
    (lambda c, i: dataclasses.replace(c, consistency=1.0), "without consistency"),
    (lambda c, i: dataclasses.replace(c, contrastive=1.0), "without contrastive"),
    (lambda c, i: dataclasses.replace(c, cluster_contrastive=1.0), "without cluster_contrastive"),
    (lambda c, i: dataclasses.replace(c, latent="gaussian", estimator="reparam", estimator_options={},
                                      gaussian_contrastive=1.0), "without gaussian_contrastive"),
    (lambda c, i: dataclasses.replace(c, out=c.out.rsplit("-", 1)[0]), "its own out"),
])
def test_runs_that_cannot_stack_are_refused_before_any_training(tmp_path, change, match):
    cfgs = [change(c, i) for i, c in enumerate(stack_of(base(tmp_path), tmp_path, [1, 2]))]
    with pytest.raises(InputError, match=match):
        train_stacked(cfgs, data=digits())
    assert not (tmp_path / "stack").exists()


def test_run_streams_draw_each_runs_part_from_its_generator_and_refuse_other_draws():
    streams = RunStreams([torch.Generator().manual_seed(s) for s in (7, 8)])
    with streams.sampling(), sampling():
        u, e = torch.rand(2, 3, 4), torch.empty(2, 5).exponential_()
    for r, seed in enumerate((7, 8)):
        own = torch.Generator().manual_seed(seed)
        assert torch.equal(u[r], torch.rand(3, 4, generator=own))
        assert torch.equal(e[r], torch.empty(5).exponential_(generator=own))
    with pytest.raises(InputError, match="first axis must index the runs"), streams.sampling(), sampling():
        torch.rand(3, 4)
    with pytest.raises(InputError, match="drew from torch's generator besides"), streams.sampling():
        torch.rand(2, 4)  # not a latent's draw: from the global generator, which no run owns


@pytest.mark.parametrize("name", sorted(__import__("discvae").ESTIMATORS))
def test_every_registered_estimator_stacks_or_is_refused_up_front(tmp_path, name):
    """Each registered estimator either trains stacked, each seed as it trains alone, or is refused in one line
    before anything is written (``Estimator.stackable``: those that learn parameters of their own, take gradients
    with respect to z, or draw their randomness in place)."""
    from discvae import make_estimator
    more = dict(latent="gaussian", estimator_options={}) if name == "reparam" else \
        dict(estimator_options={"num_samples": 2})
    cfg = base(tmp_path, estimator=name, epochs=1, **more)
    cfgs, data = stack_of(cfg, tmp_path, [1, 2]), digits()
    if not make_estimator(name, **cfg.estimator_options).stackable:
        with pytest.raises(InputError, match=f"estimator {name} cannot train stacked"):
            train_stacked(cfgs, data=data)
        assert not (tmp_path / "stack").exists()
        return
    stacked = train_stacked(cfgs, data=data)
    solo = train(dataclasses.replace(cfgs[1], out=str(tmp_path / "solo")), progress=False, data=data)
    assert (weights(stacked[1].model) - weights(solo.model)).abs().max() <= TOLERANCE
