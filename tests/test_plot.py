"""Pictures (convnet.plot): valid, non-blank PNGs of the documented sizes, computed by the engine."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

# matplotlib is in the [test] extra: a missing one fails here loudly instead of skipping.
import matplotlib.image as mpimg
import numpy as np
import pytest

from convnet import layers as L
from convnet import plot
from convnet.gradcheck import numerical_gradient
from convnet.model import Sequential, lenet


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def assert_png(path: str, size: tuple[int, int]) -> np.ndarray:
    assert os.path.isfile(path)
    assert png_size(path) == size
    img = mpimg.imread(path)
    assert img.shape[:2] == (size[1], size[0])
    assert float(img[..., :3].var()) > 1e-4, f"{path} is blank"
    return img


def tiny_model(dtype=np.float64) -> Sequential:
    """1x12x12 -> conv(4) -> pool -> conv(6) -> avgpool -> 3 logits."""
    return Sequential(
        L.Conv2d(1, 4, 3, padding=1, rng=0, dtype=dtype), L.ReLU(), L.MaxPool2d(2),
        L.Conv2d(4, 6, 3, rng=1, dtype=dtype), L.Tanh(), L.AvgPool2d(2),
        L.Flatten(), L.Linear(24, 3, rng=2, dtype=dtype),
    )


@pytest.fixture(scope="module")
def digits():
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 12, 12))
    x[:, :, 3:9, 5:7] += 1.0  # a bar, so the input picture has structure
    return x, rng.integers(0, 3, size=12)


HISTORY = [{"epoch": i + 1, "loss": 1.0 / (i + 1), "accuracy": 0.7 + 0.05 * i, "val_loss": 1.1 / (i + 1),
            "val_accuracy": 0.68 + 0.05 * i, "time": 0.5} for i in range(4)]


def test_importing_plot_does_not_import_matplotlib():
    code = "import sys, convnet.plot; sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_missing_matplotlib_is_one_clear_error():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from convnet import plot\n"
            "try:\n    plot.learning_curves_png([{'epoch': 1, 'loss': 1.0, 'accuracy': 0.5}], 'x.png')\n"
            "except plot.MatplotlibMissingError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "matplotlib is not installed: pip install 'convnet[plot]'\n"
    assert isinstance(plot.MatplotlibMissingError(), ImportError)


def test_learning_curves(tmp_path):
    path = plot.learning_curves_png(HISTORY, tmp_path / "lc.png")
    assert path == str(tmp_path / "lc.png")
    assert_png(path, (1000, 400))
    # Without validation, and a single epoch, still draws (rewritten in place).
    no_val = [{**h, "val_loss": None, "val_accuracy": None} for h in HISTORY[:1]]
    assert_png(plot.learning_curves_png(no_val, tmp_path / "lc.png"), (1000, 400))
    assert sorted(os.listdir(tmp_path)) == ["lc.png"]  # no temporary files left behind


@pytest.mark.parametrize("history", [[], None, [{"epoch": 1, "loss": 1.0}], ["epoch 1"]])
def test_learning_curves_rejects_bad_history(tmp_path, history):
    with pytest.raises(ValueError, match="history"):
        plot.learning_curves_png(history, tmp_path / "lc.png")
    assert not (tmp_path / "lc.png").exists()


def test_filters_grid_and_channel_by_channel(tmp_path):
    model = tiny_model()
    first = assert_png(plot.filters_png(model[0].weight, tmp_path / "f1.png"), (4 * 90 + 120, 90 + 60))
    second = assert_png(plot.filters_png(model[3].weight, tmp_path / "f2.png"), (4 * 90 + 120, 6 * 90 + 60))
    # Diverging colour map: both reds and blues appear for weights of both signs.
    for img in (first, second):
        rgb = img[..., :3].reshape(-1, 3)
        assert np.any(rgb[:, 0] - rgb[:, 2] > 0.3) and np.any(rgb[:, 2] - rgb[:, 0] > 0.3)
    with pytest.raises(ValueError, match=r"\(F, C, KH, KW\)"):
        plot.filters_png(np.zeros((3, 3)), tmp_path / "bad.png")


def test_feature_maps(tmp_path, digits):
    x, y = digits
    model = tiny_model()
    model.train()
    path = plot.feature_maps_png(model, x[0], tmp_path / "fm.png", label=int(y[0]))
    # Five blocks (input, conv, pool, conv, pool) of one row each under a title row.
    assert_png(path, (8 * 90 + 140, 40 + 5 * (90 + 30)))
    assert model.training  # mode restored
    with pytest.raises(ValueError, match="one image"):
        plot.feature_maps_png(model, x[:2], tmp_path / "fm2.png")
    with pytest.raises(ValueError, match="no Conv2d or pooling layer"):
        plot.feature_maps_png(Sequential(L.Flatten(), L.Linear(144, 2, rng=0, dtype=np.float64)), x[0],
                              tmp_path / "fm3.png")


def test_feature_maps_come_from_the_layers_one_by_one(digits):
    x, _ = digits
    model = tiny_model()
    outs = plot._layer_outputs(model, x[:1])
    assert [name for name, _ in outs] == ["layer 0: Conv2d 1->4, 3x3, padding 1", "layer 2: MaxPool2d 2x2",
                                          "layer 3: Conv2d 4->6, 3x3", "layer 5: AvgPool2d 2x2"]
    expected = x[:1]
    for i in range(6):
        expected = model[i].forward(expected)
    np.testing.assert_array_equal(outs[-1][1], expected[0])


def test_saliency_is_the_gradient_of_the_predicted_score(digits):
    x, _ = digits
    model = tiny_model()
    for p in model.parameters():
        p.grad[...] = 7.0
    grad, pred, logits = plot.saliency_map(model, x[3])
    assert grad.shape == (1, 12, 12) and pred == int(np.argmax(logits))
    numeric = numerical_gradient(lambda z: model.predict(z[None])[0, pred], x[3])
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    assert all(np.all(p.grad == 7.0) for p in model.parameters())  # parameter gradients untouched


def test_saliency_picture(tmp_path, digits):
    x, y = digits
    img = assert_png(plot.saliency_png(tiny_model(np.float32), x[0].astype(np.float32), tmp_path / "s.png",
                                       label=int(y[0])), (1050, 360))
    assert img.shape[2] in (3, 4)


def test_confusion_matrix_picture(tmp_path):
    big = np.diag(np.arange(10) * 10 + 5) + 1
    assert_png(plot.confusion_matrix_png(big, tmp_path / "cm.png"), (700, 640))
    with pytest.raises(ValueError, match="square"):
        plot.confusion_matrix_png(np.zeros((2, 3), int), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-negative integer"):
        plot.confusion_matrix_png(np.full((2, 2), 0.5), tmp_path / "bad.png")


def test_plot_model_writes_the_stable_names_and_echoes_each(tmp_path, digits):
    x, y = digits
    seen: list[str] = []
    paths = plot.plot_model(tiny_model(), tmp_path / "out", x, y, index=2, history=HISTORY, echo=seen.append)
    names = ["learning_curves.png", "filters_conv1.png", "filters_conv2.png", "feature_maps.png", "saliency.png",
             "confusion_matrix.png"]
    assert [os.path.basename(p) for p in paths] == names
    assert seen == paths
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
    for p in paths:
        assert png_size(p)[0] > 100
    with pytest.raises(ValueError, match=r"index must be an int in \[0, 11\]"):
        plot.plot_model(tiny_model(), tmp_path / "out", x, y, index=12, echo=None)


# --------------------------------------------------------------------------- the command line

NO_MPL = "import sys; sys.modules['matplotlib'] = None\nfrom convnet.cli import main\nsys.exit(main({argv!r}))"


def run_cli(argv: list[str], cwd, block_matplotlib: bool = False) -> subprocess.CompletedProcess:
    code = NO_MPL.format(argv=argv) if block_matplotlib else \
        f"import sys\nfrom convnet.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_train_with_plots_writes_curves_then_the_rest(tmp_path):
    r = run_cli(["train", "--epochs", "2", "--limit", "200", "--val-split", "0.25", "--quiet",
                 "--out", "m.npz", "--plots", "pics"], tmp_path)
    assert r.returncode == 0, r.stderr
    names = ["learning_curves.png", "filters_conv1.png", "filters_conv2.png", "feature_maps.png", "saliency.png",
             "confusion_matrix.png"]
    printed = [line.split(" ")[0] for line in r.stdout.splitlines() if line.startswith("pics")]
    assert printed == [os.path.join("pics", n) for n in names]
    assert_png(str(tmp_path / "pics" / "learning_curves.png"), (1000, 400))
    assert_png(str(tmp_path / "pics" / "confusion_matrix.png"), (700, 640))
    # The default network: the input, then each conv and pool output, in rows of 8 maps.
    c1, c2 = (layer.out_channels for layer in lenet().layers if isinstance(layer, L.Conv2d))
    rows = 1 + 2 * math.ceil(c1 / 8) + 2 * math.ceil(c2 / 8)
    assert_png(str(tmp_path / "pics" / "feature_maps.png"), (8 * 90 + 140, 40 + 5 * 30 + rows * 90))

    r = run_cli(["plot", "m.npz", "--out", "again", "--index", "7"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [os.path.join("again", n) for n in names[1:]]
    assert_png(str(tmp_path / "again" / "saliency.png"), (1050, 360))


def test_cli_without_matplotlib_is_one_line_and_nonzero(tmp_path):
    message = "matplotlib is not installed: pip install 'convnet[plot]'"
    r = run_cli(["train", "--epochs", "1", "--limit", "50", "--out", "m.npz", "--plots", "pics"], tmp_path,
                block_matplotlib=True)
    assert r.returncode == 1
    assert r.stderr == f"convnet train: error: {message}\n"
    assert r.stdout == "" and os.listdir(tmp_path) == []  # failed before training or writing anything
    r = run_cli(["plot", "m.npz", "--out", "pics"], tmp_path, block_matplotlib=True)
    assert r.returncode == 1 and r.stderr == f"convnet plot: error: {message}\n"


def test_cli_plot_bad_arguments(tmp_path):
    from convnet.model import lenet

    lenet(rng=0).save(str(tmp_path / "m.npz"))
    (tmp_path / "file").write_text("x")
    for argv, code, message in [
        (["plot", "m.npz", "--out", "p", "--index", "1000"], 2, "--index must be below the number of test images"),
        (["plot", "missing.npz", "--out", "p"], 1, "does not exist"),
        (["plot", "m.npz", "--out", "file"], 2, "exists and is not a directory"),
        (["plot", "m.npz"], 2, "the following arguments are required: --out"),
    ]:
        r = run_cli(argv, tmp_path)
        assert r.returncode == code, (argv, r.stderr)
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_pictures_get_the_users_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = plot.learning_curves_png(HISTORY, tmp_path / "lc.png")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
