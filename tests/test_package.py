"""The package itself: its version, its names, and what it needs at run time."""

import subprocess
import sys
from importlib import metadata

import pytest

import convnet
from convnet import cli


def test_version_comes_from_the_package_metadata(capsys):
    assert convnet.__version__ == metadata.version("convnet")
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"convnet {convnet.__version__}\n"


def test_optimizers_is_a_deprecated_name_of_optim():
    with pytest.warns(DeprecationWarning, match="use convnet.optim"):
        assert convnet.optimizers is convnet.optim
    assert "optimizers" not in convnet.__all__
    with pytest.raises(AttributeError, match="no attribute 'optimisers'"):
        convnet.optimisers  # noqa: B018


def test_the_engine_runs_without_scipy(tmp_path):
    # scipy is a test dependency only: training, saving and loading must never import it.
    code = """
import sys
sys.modules["scipy"] = None  # any import of scipy now raises ImportError
import numpy as np
import convnet, convnet.cli, convnet.explain, convnet.gradcheck, convnet.plot
from convnet import layers as L
rng = np.random.default_rng(0)
x, y = rng.standard_normal((16, 1, 6, 6)).astype(np.float32), rng.integers(0, 2, 16)
model = convnet.Sequential(L.Conv2d(1, 2, 3, rng=0), L.ReLU(), L.MaxPool2d(2), L.Flatten(), L.Linear(8, 2, rng=1))
convnet.fit(model, x, y, epochs=1, batch_size=8, progress=False)
model.save(sys.argv[1])
convnet.load(sys.argv[1])
assert "scipy" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
