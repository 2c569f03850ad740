"""convnet.dask on a real dask.distributed LocalCluster with 2 worker processes."""

import logging
import pickle

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster

import convnet
import convnet.dask as cd
from convnet import functional as F


@pytest.fixture(scope="module")
def client():
    # Every task goes to its worker at once (no queuing on the scheduler, no work stealing), so
    # each worker fetches the model key once and keeps it while its tasks run. With tasks handed
    # out as workers free up, or stolen, a worker that had already released the key could be
    # given another task and fetch it again (seen in full-suite runs: 2 arrivals on one worker).
    with dask.config.set({"distributed.scheduler.work-stealing": False,
                          "distributed.scheduler.worker-saturation": float("inf")}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as c:
        c.wait_for_workers(2)
        yield c


@pytest.fixture(scope="module")
def model():
    return convnet.lenet(rng=3)


def images(n=96, seed=0):
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def counts(client):
    return client.run(cd.process_counts)


def test_predictions_equal_model_predict_and_the_model_reaches_each_worker_once(client, model):
    x = images()
    lazy = cd.predict(model, da.from_array(x, chunks=8), batch_size=8, output="logits")
    before = counts(client)
    assert isinstance(lazy, da.Array) and lazy.shape == (96, 10) and lazy.numblocks == (12, 1)
    assert counts(client) == before  # nothing ran yet: the result is lazy
    logits = lazy.compute()
    # The workers' BLAS may sum in another order (threads, kernels): float32 rounding apart.
    np.testing.assert_allclose(logits, model.predict(x, batch_size=8), rtol=1e-5, atol=1e-6)
    assert np.array_equal(logits.argmax(axis=1), model.predict(x).argmax(axis=1))
    after = counts(client)
    arrivals = {w: after[w]["arrivals"] - before[w]["arrivals"] for w in after}
    loads = {w: after[w]["loads"] - before[w]["loads"] for w in after}
    # 12 chunks, 2 workers: the model file reached each worker at most once and was built once there.
    assert len(arrivals) == 2 and set(arrivals.values()) <= {0, 1} and sum(arrivals.values()) >= 1
    assert loads == arrivals


def test_probabilities_and_labels(client, model):
    x = images(50, seed=1)
    ref = model.predict(x)
    probs = cd.predict(model, da.from_array(x, chunks=(20, 1, 14, 28))).compute()  # rechunked to whole images
    np.testing.assert_allclose(probs, F.softmax(ref, axis=1), rtol=1e-5, atol=1e-7)
    labels = cd.predict(model, da.from_array(x, chunks=20), output="labels")
    assert labels.dtype == np.int64 and labels.chunks == ((20, 20, 10),)
    assert np.array_equal(labels.compute(), ref.argmax(axis=1))
    # uint8 chunks are converted lazily to the model's dtype
    assert cd.predict(model, da.from_array(x.astype(np.float64), chunks=25)).dtype == np.float32


def test_shipped_model_pickles_as_the_model_file(tmp_path, model):
    shipped = cd.ShippedModel.from_model(model)
    func, (data,) = shipped.__reduce__()
    assert func is cd._arrive and data[:2] == b"PK"  # convnet's .npz model file, not a pickled object graph
    path = tmp_path / "m.npz"
    path.write_bytes(data)
    x = images(4)
    assert np.array_equal(convnet.load(path).predict(x), model.predict(x))
    again = pickle.loads(pickle.dumps(shipped))
    assert again.digest == shipped.digest and np.array_equal(again.model.predict(x), model.predict(x))


def test_bad_arguments_are_refused_before_any_work(model):
    x = da.zeros((4, 1, 28, 28), chunks=2, dtype=np.float32)
    with pytest.raises(TypeError, match="images must be a dask array"):
        cd.predict(model, np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"images must be \(N, C, H, W\)"):
        cd.predict(model, da.zeros((4, 28, 28), chunks=2))
    with pytest.raises(ValueError, match=r"do not fit the model, which takes \(1, 28, 28\)"):
        cd.predict(model, da.zeros((4, 1, 20, 20), chunks=2))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        cd.predict(model, x, batch_size=0)
    with pytest.raises(ValueError, match="output must be 'probabilities', 'labels' or 'logits'"):
        cd.predict(model, x, output="probs")
    with pytest.raises(TypeError, match="model must be a convnet Sequential"):
        cd.predict("model.npz", x)


def test_cli_predict_on_the_cluster_prints_what_local_predict_prints(client, model, tmp_path):
    from test_predict import expected_line, run_cli

    path = tmp_path / "m.npz"
    model.save(path)
    pixels = (images(30) * 255).astype(np.uint8)
    np.save(tmp_path / "x.npy", pixels)
    remote = run_cli("predict", path, tmp_path / "x.npy", "--top", "2", "--batch-size", "10",
                     "--scheduler", client.scheduler.address)
    assert remote.returncode == 0 and remote.stderr == "", remote.stderr
    logits = model.predict(pixels.astype(np.float32) / np.float32(255))
    lines = remote.stdout.splitlines()
    assert len(lines) == 30
    for i, line in enumerate(lines):
        want = expected_line(f"{tmp_path / 'x.npy'}[{i}]", logits[i], 2)
        # Same classes; probabilities (4 decimals) agree within float32 rounding.
        assert line.split(" (")[0] == want.split(" (")[0]
        assert abs(float(line.split("(")[1][:6]) - float(want.split("(")[1][:6])) <= 1e-4
