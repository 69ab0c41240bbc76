"""``VAE.codes`` / ``VAE.encode`` and ``discvae encode``: deterministic codes, posterior probabilities, the .npz."""
import shutil

import numpy as np
import pytest
import torch

from discvae import load_dataset
from discvae.applications import codes as codes_module
from discvae.applications.codes import encode_run, framed_grid
from discvae.data import Dataset
from discvae.distributions import Bernoulli, Categorical
from discvae.errors import InputError
from discvae.figures import image_grid
from helpers import assert_one_line_error, drawn, run_cli, tiny_data, tiny_model, train_digits

N_DIGITS, N_TEST = 1797, 297


@pytest.mark.parametrize("latent,classes,groups", [("bernoulli", 5, 1), ("categorical", 4, 3), ("gaussian", 3, 1)])
def test_codes_are_the_posterior_modes_in_any_batching(latent, classes, groups):
    model = tiny_model(latent, classes, groups).train()
    x = tiny_data(7)
    q = model.posterior(x)
    probs, codes = model.encode(x, batch_size=3), model.codes(x, batch_size=3)
    assert model.training  # restored after encoding in eval mode
    assert not probs.requires_grad and torch.allclose(probs, model.encode(x, batch_size=100))
    if latent == "bernoulli":
        assert codes.dtype == torch.uint8 and codes.shape == (7, classes)
        assert torch.equal(codes, (q.logits > 0).to(torch.uint8))
        assert torch.allclose(probs, torch.sigmoid(q.logits))
    elif latent == "categorical":
        assert codes.shape == (7, groups) and probs.shape == (7, groups, classes)
        assert torch.equal(codes, probs.argmax(-1))
        assert torch.allclose(probs.sum(-1), torch.ones(7, groups, dtype=probs.dtype))
    else:
        assert torch.allclose(codes, q.loc) and torch.equal(codes, probs)


@pytest.mark.parametrize("n_rows, scale", [(2, 7), (150, 1)])
def test_framed_grid_shows_the_images_at_their_scale_with_frames_and_a_title(monkeypatch, n_rows, scale):
    """Rows of 8x8 images, 2-pixel gaps, shown about 56 pixels high (7 screen pixels per image pixel), or smaller
    so the grid stays under 2000 pixels; a frame (i, j, colour) centred on the gap around image j of row i; the
    title in a 30-pixel strip above."""
    from matplotlib.colors import to_rgba

    rows = [torch.rand(3 if i % 2 == 0 else 2, 1, 8, 8, generator=torch.Generator().manual_seed(i))
            for i in range(n_rows)]
    fig = drawn(monkeypatch, lambda: framed_grid("x.png", rows, [(1, 2, "red"), (0, 0, "tab:blue")], "a title"))
    grid_h, grid_w = 10 * n_rows + 2, 32  # 2 + 10 per image and gap
    assert fig.dpi == 100 and tuple(fig.get_size_inches() * 100) == pytest.approx((grid_w * scale,
                                                                                    grid_h * scale + 30))
    (ax,) = fig.axes
    assert np.array_equal(ax.images[0].get_array(), image_grid(rows, 2))
    assert ax.images[0].get_clim() == (0, 1) and not ax.axison
    assert tuple(ax.get_position().bounds) == pytest.approx((0, 0, 1, grid_h * scale / (grid_h * scale + 30)))
    frames = [(p.get_xy(), p.get_width(), p.get_height(), to_rgba(p.get_edgecolor()), p.get_fill()) for p in
              ax.patches]
    assert frames == [((20.5, 10.5), 10, 10, to_rgba("red"), False), ((0.5, 0.5), 10, 10, to_rgba("tab:blue"), False)]
    (title,) = fig.texts
    assert title.get_text() == "a title"
    assert title.get_position() == pytest.approx((0.5, 1 - 15 / (grid_h * scale + 30)))


def test_split_images_and_labels_of_each_split():
    data = load_dataset("digits")
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test),
                        ("all", torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]))):
        images, labels = codes_module.split_images(data, split)
        assert torch.equal(images, x) and np.array_equal(labels, y.numpy()), split
        assert np.array_equal(codes_module.labels_of(data, split, "retrieval"), y.numpy())
    with pytest.raises(InputError) as caught:
        codes_module.split_images(data, "val")
    assert str(caught.value) == "unknown split 'val'; choose one of train, test, all"
    half = Dataset("half", data.x_train, data.y_train, data.x_test, None)  # the test split unlabelled
    assert codes_module.split_images(half, "train")[1] is not None and codes_module.split_images(half, "all")[1] is None
    with pytest.raises(InputError) as caught:
        codes_module.labels_of(half, "all", "clustering")
    assert str(caught.value) == "clustering needs class labels, and dataset 'half' has none for its all split"


def test_coded_runs_are_labelled_by_directory_and_share_a_dataset_and_a_family(tmp_path):
    """``load_coded_runs``: name -> (config, model, data) in the order given; refused, in full, when two runs go by
    one name or by a reserved one, when the code is of another family, and when the datasets differ."""
    bits = train_digits(tmp_path / "bits")
    cat = train_digits(tmp_path / "cat", "--latent", "categorical", "--latent-dim", "4")
    np.savez(tmp_path / "other.npz", x_train=np.random.default_rng(0).random((60, 8, 8)))
    other = train_digits(tmp_path / "other", "--dataset", tmp_path / "other.npz")
    runs = codes_module.load_coded_runs([cat, tmp_path / "bits"], None)
    assert list(runs) == ["cat", "bits"] and runs["cat"][0].latent == "categorical"
    assert codes_module.code_block(runs["cat"][1]).family is Categorical
    assert codes_module.load_coded_run(bits, Bernoulli)[2].name == "digits"
    hybrid = codes_module.load_coded_run(train_digits(tmp_path / "hybrid", "--latent", "gaussian:2+bernoulli:4"))[1]
    assert codes_module.code_block(hybrid) is hybrid.space.blocks[1]  # the discrete block, not the first
    gauss = codes_module.load_coded_run(train_digits(tmp_path / "gauss", "--latent", "gaussian", "--estimator",
                                                     "reparam"))[1]
    assert codes_module.code_block(gauss) is gauss.space.blocks[0]  # no discrete block: the only one
    shutil.copytree(bits, tmp_path / "lsh")
    for args, message in (
            (([bits, bits], Bernoulli), "run directories need distinct names to label them: bits, bits"),
            (([bits, tmp_path / "lsh"], Bernoulli, ("lsh", "itq")),
             "run directories need distinct names, other than lsh, itq, to label them: bits, lsh"),
            (([bits, cat], Bernoulli), f"{cat} has a categorical:4 latent; this needs one bernoulli block (beside "
                                       "Gaussian ones at most)"),
            (([bits, other], Bernoulli), f"the runs must share one dataset, got {tmp_path / 'other.npz'}, digits")):
        with pytest.raises(InputError) as caught:
            codes_module.load_coded_runs(*args)
        assert str(caught.value) == message


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    return {"bits": train_digits(root / "bits"),
            "cat": train_digits(root / "cat", "--latent", "categorical", "--latent-dim", "10")}


def test_encode_writes_one_row_per_image(runs, tmp_path, capsys):
    out = tmp_path / "codes.npz"
    code, stdout, _ = run_cli(capsys, "encode", runs["bits"], "--out", out, "--batch-size", "100")
    assert code == 0 and str(out) in stdout
    data = load_dataset("digits")
    with np.load(out, allow_pickle=False) as f:
        assert f["codes"].shape == (N_DIGITS, 8) and f["codes"].dtype == np.uint8
        assert set(np.unique(f["codes"])) <= {0, 1}
        assert np.array_equal(f["codes"], (f["probs"] > 0.5).astype(np.uint8))
        assert np.array_equal(f["packed"], np.packbits(f["codes"], axis=-1)) and f["packed"].shape == (N_DIGITS, 1)
        assert np.array_equal(f["labels"], np.concatenate([data.y_train.numpy(), data.y_test.numpy()]))
        assert (str(f["latent"]), int(f["latent_dim"]), int(f["groups"]), str(f["split"])) == \
            ("bernoulli:8", 8, 1, "all")
    assert not list(tmp_path.glob(".*.tmp"))


def test_encode_a_categorical_run_on_the_test_split(runs, tmp_path, capsys):
    out = tmp_path / "cat.npz"
    code, _, _ = run_cli(capsys, "encode", runs["cat"], "--out", out, "--split", "test")
    assert code == 0
    with np.load(out, allow_pickle=False) as f:
        assert f["codes"].shape == (N_TEST, 1) and f["probs"].shape == (N_TEST, 1, 10)
        assert np.array_equal(f["codes"][:, 0], f["probs"][:, 0].argmax(-1))
        assert "packed" not in f.files and str(f["split"]) == "test" and len(f["labels"]) == N_TEST


def test_encode_rejects_bad_input(runs, tmp_path, capsys):
    code, _, err = run_cli(capsys, "encode", tmp_path / "nothing", "--out", tmp_path / "c.npz")
    assert_one_line_error(code, err, "not a run directory")
    code, _, err = run_cli(capsys, "encode", runs["bits"], "--out", tmp_path / "c.npz", "--batch-size", "0")
    assert_one_line_error(code, err, "--batch-size")
    assert not (tmp_path / "c.npz").exists()


def test_encode_run_defaults_batches_of_one_and_unlabelled_data(runs, tmp_path):
    """The Python API: every image (``all``) unless told; a batch of one image is allowed; a run trained on data
    without labels writes no ``labels``; the file holds exactly the arrays returned."""
    arrays = encode_run(runs["bits"], tmp_path / "all.npz")
    assert str(arrays["split"]) == "all" and len(arrays["codes"]) == N_DIGITS
    ones = encode_run(runs["bits"], tmp_path / "ones.npz", split="test", batch_size=1)
    assert np.array_equal(ones["codes"], arrays["codes"][-N_TEST:])
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x_train=np.random.default_rng(0).random((60, 8, 8)))
    run = train_digits(tmp_path / "nolabels", "--dataset", unlabelled)
    written = encode_run(run, tmp_path / "nolabels.npz")
    assert "labels" not in written and len(written["codes"]) == 60
    with np.load(tmp_path / "nolabels.npz", allow_pickle=False) as f:
        assert sorted(f.files) == sorted(written)
