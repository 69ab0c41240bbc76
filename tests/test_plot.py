"""``discvae plot``: every promised PNG exists, opens, has the expected pixel size and stays small."""
import matplotlib.image as mpimg
import pytest

from discvae.cli import main

SCALE, SIDE = 7, 8  # digits are 8x8, shown 7x (save_grid's default, images about 56 px high)


def grid_shape(rows: int, cols: int) -> tuple[int, int]:
    """Pixel size of ``rows`` x ``cols`` 8x8 images with 1-pixel gaps, scaled."""
    return (rows * (SIDE + 1) + 1) * SCALE, (cols * (SIDE + 1) + 1) * SCALE


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    for name, latent, dim in (("bvae", "bernoulli", 8), ("cvae", "categorical", 10)):
        assert main(["train", "--dataset", "digits", "--latent", latent, "--latent-dim", str(dim), "--epochs", "2",
                     "--batch-size", "512", "--grad-var-every", "1", "--grad-var-repeats", "2",
                     "--out", str(root / name), "--quiet"]) == 0
    return root


def test_plot_writes_every_figure(runs, capsys):
    out = runs / "figures"
    capsys.readouterr()
    assert main(["plot", str(runs / "bvae"), str(runs / "cvae"), "--out", str(out), "--n", "5", "--rows", "2"]) == 0
    printed = capsys.readouterr().out.split()
    expected = {"convergence.png": (520, 960),
                "bvae-reconstructions.png": grid_shape(4, 5), "bvae-samples.png": grid_shape(2, 5),
                "cvae-reconstructions.png": grid_shape(4, 5), "cvae-samples.png": grid_shape(2, 5),
                "cvae-templates.png": grid_shape(2, 5),  # the 10 classes, 5 per row
                "bvae-units.png": (256, 640), "cvae-units.png": (256, 640),  # information per unit, 8 x 3.2 in
                "reconstructions.png": grid_shape(6, 5)}  # test images above both runs' reconstructions, twice
    assert sorted(printed) == sorted(str(out / name) for name in expected)
    for name, shape in expected.items():
        assert mpimg.imread(out / name).shape[:2] == shape, name
        assert (out / name).stat().st_size < 200_000
    assert not list(out.glob(".*.tmp"))


def test_plot_defaults_to_the_first_run_and_rejects_bad_input(runs, capsys):
    assert main(["plot", str(runs / "bvae")]) == 0
    assert (runs / "bvae" / "convergence.png").is_file() and (runs / "bvae" / "bvae-samples.png").is_file()
    for argv, match in ((["plot", str(runs / "missing")], "not a run directory"),
                        (["plot", str(runs / "bvae"), "--n", "0"], "--n")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and match in err
