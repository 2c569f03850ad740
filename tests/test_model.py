"""Sequential: whole-network gradients, overfitting, summary, errors; save/load."""

import json
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convnet
from convnet import functional as F
from convnet import layers as L
from convnet import model as model_mod
from convnet.gradcheck import check_gradient
from convnet.losses import CrossEntropyLoss
from convnet.model import ModelFileError, Sequential
from strategies import pool_cases


def tiny_net(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2d(1, 2, 3, padding=1, rng=rng, dtype=dtype), L.LeakyReLU(0.05), L.MaxPool2d(2),
        L.Conv2d(2, 3, 3, stride=1, rng=rng, dtype=dtype), L.Tanh(), L.AvgPool2d(2, padding=1),
        L.Flatten(), L.Linear(12, 5, rng=rng, dtype=dtype), L.Sigmoid(), L.Dropout(0.3, rng=1),
        L.Linear(5, 3, rng=rng, dtype=dtype), L.ReLU(),
        input_shape=(1, 8, 8),
    )


@given(case=pool_cases(special=True), training=st.booleans(), input_grad=st.booleans())
def test_relu_then_max_pool_runs_pooling_first_with_the_same_numbers(case, training, input_grad):
    """Sequential runs ReLU after a MaxPool2d that follows it (they commute); outputs and
    gradients are those of the written order, to the bit: ties, padding, overlapping
    windows, nan and inf in x and dy included."""
    k, s, p = case.args
    pool = L.MaxPool2d(k, s, p)
    model = Sequential(L.ReLU(), pool)
    model.train(training)
    y = model.forward(case.x)
    assert pool._x is case.x  # the pool ran first, on the pre-ReLU map
    r = F.relu(case.x)
    if training:
        y_ref, argmax = F.max_pool2d_with_argmax(r, k, s, p)
    else:
        y_ref, argmax = F.max_pool2d(r, k, s, p), None
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(y, y_ref)
    if not training:
        return
    dx = model.backward(case.dy, input_grad=input_grad)
    if not input_grad:  # no parameter layer: nothing needs the input gradient
        assert dx is None
        return
    dx_ref = F.relu_backward(F.max_pool2d_backward(case.dy, r, k, s, p, argmax=argmax), case.x)
    np.testing.assert_array_equal(dx, dx_ref)


def test_run_order_swaps_only_a_relu_directly_before_a_max_pool():
    net = convnet.lenet(rng=0)
    assert model_mod._run_order(net.layers) == [0, 2, 1, 3, 5, 4, 6, 7, 8, 9, 10]
    layers = [L.ReLU(), L.AvgPool2d(2), L.LeakyReLU(), L.MaxPool2d(2), L.MaxPool2d(2), L.ReLU(),
              L.ReLU(), L.MaxPool2d(2), L.ReLU()]
    assert model_mod._run_order(layers) == [0, 1, 2, 3, 4, 5, 7, 6, 8]


def test_sequential_backward_matches_numerical_gradient_of_the_loss():
    model = tiny_net()
    model.eval()  # dropout off: a deterministic function of x and the weights
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 1, 8, 8))
    y = np.array([0, 2, 1])
    loss_fn = CrossEntropyLoss()
    params = model.parameters()
    assert [p.name for p in params] == ["0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias",
                                        "10.weight", "10.bias"]
    model.zero_grad()
    loss_fn(model.forward(x), y)
    dx = model.backward(loss_fn.backward())
    analytic = {"x": dx, **{p.name: p.grad.copy() for p in params}}
    start = {"x": x, **{p.name: p.data.copy() for p in params}}

    def f(x, **weights):
        for p in params:
            p.data[...] = weights[p.name]
        return loss_fn.forward(model.forward(x), y)

    report = check_gradient(f, start, analytic, rtol=1e-5, atol=1e-9)
    assert report.ok, str(report)


def test_backward_without_input_gradient_keeps_parameter_gradients():
    """Training skips d(loss)/d(input): below the first parametrised layer nothing runs."""
    model = Sequential(L.ReLU(), L.Conv2d(2, 3, 3, padding=1, rng=0), L.ReLU(), L.Flatten(),
                       L.Linear(3 * 4 * 4, 5, rng=1))
    x = np.random.default_rng(0).standard_normal((2, 2, 4, 4))
    model = model.astype(np.float64)
    dy = np.random.default_rng(1).standard_normal((2, 5))
    model.forward(x)
    dx = model.backward(dy)
    full = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model.forward(x)
    model.layers[0].backward = None  # must not be reached
    assert model.backward(dy, input_grad=False) is None
    assert dx.shape == x.shape
    for a, b in zip(full, (p.grad for p in model.parameters())):
        np.testing.assert_array_equal(a, b)


def test_small_network_overfits_a_tiny_batch():
    x_train, y_train, _, _ = convnet.datasets.load_mnist_5k()
    x, y = x_train[:20], y_train[:20]
    model = Sequential(L.Conv2d(1, 4, 3, rng=0), L.ReLU(), L.MaxPool2d(2), L.Flatten(),
                       L.Linear(4 * 13 * 13, 10, rng=1))
    history = convnet.fit(model, x, y, epochs=60, batch_size=20, optimizer=convnet.Adam(0.01), progress=False)
    assert history[0]["accuracy"] < 0.6
    assert history[-1]["loss"] < 0.05
    assert np.array_equal(model.predict(x).argmax(1), y)


def test_forward_errors_name_the_layer():
    model = Sequential(L.Conv2d(1, 2, 3), L.ReLU(), L.Flatten(), L.Linear(10, 2))
    with pytest.raises(ValueError, match=r"layer 3 \(Linear\(10, 2\)\).*input shape \(4, 72\).*\(N, 10\)"):
        model.forward(np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\(1, 2, 3\)\)"):
        model.forward(np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"layer 0 .*kernel"):
        model.forward(np.zeros((4, 1, 2, 2), np.float32))
    with pytest.raises(TypeError, match="Sequential argument 1 must be a Layer"):
        Sequential(L.ReLU(), "relu")


def test_predict_batches_and_restores_mode():
    model = tiny_net(np.float32)
    x = np.random.default_rng(0).standard_normal((37, 1, 8, 8)).astype(np.float32)
    model.train()
    out = model.predict(x, batch_size=8)
    assert model.training and out.shape == (37, 3) and out.dtype == np.float32
    model.eval()
    np.testing.assert_allclose(out, model.forward(x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="batch_size"):
        model.predict(x, batch_size=0)


def test_modes_and_zero_grad_reach_every_layer():
    model = tiny_net()
    model.eval()
    assert not any(layer.training for layer in model)
    model.train()
    assert all(layer.training for layer in model)
    for p in model.parameters():
        p.grad[...] = 1
    model.zero_grad()
    assert all(not p.grad.any() for p in model.parameters())


def test_summary_lists_shapes_and_parameter_counts(capsys):
    model = convnet.lenet()
    text = model.summary()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "(N, 16, 28, 28)" in text and "(N, 800)" in text and "(N, 10)" in text
    assert f"Total params: {model.num_parameters():,}" in text
    assert model.num_parameters() == 16 * 25 + 16 + 32 * 16 * 25 + 32 + 800 * 128 + 128 + 128 * 10 + 10
    small = convnet.lenet(num_classes=3, input_shape=(2, 16, 12), channels=(4, 6), hidden=8, dropout=0)
    assert small.predict(np.zeros((2, 2, 16, 12), np.float32)).shape == (2, 3)
    assert not any(isinstance(layer, L.Dropout) for layer in small)
    with pytest.raises(ValueError, match="too small"):
        convnet.lenet(input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        convnet.lenet(input_shape=(28, 28))
    bare = Sequential(L.Flatten(), L.Linear(4, 2))
    assert "?" in bare.summary(file=open(os.devnull, "w"))
    assert "(N, 2)" in bare.summary(input_shape=(2, 2), file=open(os.devnull, "w"))


# ---------------------------------------------------------------------------------- save / load

def _all_layers_model():
    return Sequential(
        L.Conv2d(1, 3, (3, 2), stride=(1, 2), padding=1, rng=0),
        L.ReLU(), L.MaxPool2d(2, stride=1), L.Conv2d(3, 2, 3, padding="same", bias=False, rng=1),
        L.LeakyReLU(0.2), L.AvgPool2d(2), L.Tanh(), L.Flatten(), L.Dropout(0.5, rng=2),
        L.Linear(2 * 4 * 2, 6, rng=3), L.Sigmoid(), L.Linear(6, 4, bias=False, rng=4),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    model = _all_layers_model().astype(dtype)
    x = np.random.default_rng(0).standard_normal((5, 1, 9, 8)).astype(dtype)
    before = model.predict(x)
    path = tmp_path / "m.npz"
    model.save(path)
    loaded = convnet.load(path)
    assert repr(loaded) == repr(model)
    assert loaded.input_shape is None
    for a, b in zip(model.parameters(), loaded.parameters()):
        assert a.name == b.name and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data)
    assert np.array_equal(loaded.predict(x), before)
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        arch = json.loads(str(data["__architecture__"]))
    assert arch["format"] == "convnet.Sequential" and len(arch["layers"]) == len(model)


def test_saved_file_gets_the_usual_permissions(tmp_path):
    """The atomic save goes through a private temp file, but the result is not left 0600."""
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    _all_layers_model().save(tmp_path / "m.npz")
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_trained_lenet_round_trip_keeps_input_shape(tmp_path):
    model = convnet.lenet(rng=5)
    x = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    model.save(tmp_path / "lenet.npz")
    loaded = convnet.load(str(tmp_path / "lenet.npz"))
    assert loaded.input_shape == (1, 28, 28)
    assert np.array_equal(loaded.predict(x), model.predict(x))


def _saved(tmp_path, name="m.npz"):
    model = _all_layers_model()
    path = tmp_path / name
    model.save(path)
    return model, path


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    model, path = _saved(tmp_path)
    old_bytes = path.read_bytes()
    other = _all_layers_model().astype(np.float64)

    def crash(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_mod.np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]

    def no_rename(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_mod.os, "replace", no_rename)
    with pytest.raises(KeyboardInterrupt):
        other.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]
    assert repr(convnet.load(path)) == repr(model)


def test_truncated_files_are_rejected(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    for cut in (0, 10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="truncated or corrupted"):
            convnet.load(bad)


def test_corrupted_weights_are_rejected(tmp_path):
    model, path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    # flip a byte inside the stored bytes of the first conv weight
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("0.weight.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size - 8
    data[offset] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupted"):
        convnet.load(bad)


def _rewrite(path, out, mutate_arch=None, mutate_arrays=None):
    with np.load(path, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    arch = json.loads(str(arrays.pop("__architecture__")))
    if mutate_arch:
        mutate_arch(arch)
    if mutate_arrays:
        mutate_arrays(arrays)
    np.savez(out, __architecture__=np.array(json.dumps(arch)), **arrays)
    return out


def _drop_checksum(arch):
    arch.pop("sha256")


@pytest.mark.parametrize("mutate_arch, mutate_arrays, match", [
    (lambda a: a["layers"][0]["config"].update(out_channels=4), None, r"weight 0\.weight of layer 0 .*expected"),
    (lambda a: a["layers"].append({"type": "Linear", "config": {"in_features": 4, "out_features": 2}}), None,
     "weights missing for 12.weight, 12.bias"),
    (lambda a: a["layers"].pop(), None, "unexpected weights 11.weight"),
    (lambda a: a["layers"][1].update(type="Softmax"), None, "layer 1 has unknown type 'Softmax'"),
    (lambda a: a["layers"][0]["config"].update(kernel_size=0), None, r"layer 0 \(Conv2d\) has an invalid config"),
    (lambda a: a.update(version=99), None, "unsupported model file version 99"),
    (lambda a: a.update(format="keras"), None, "not a convnet model file"),
    (_drop_checksum, lambda w: w.update({"3.weight": w["3.weight"].astype(np.float64)}), "expected float32"),
    (None, lambda w: w.update({"9.bias": w["9.bias"] + 1}), "checksum mismatch"),
])
def test_mismatched_files_say_what_is_wrong(tmp_path, mutate_arch, mutate_arrays, match):
    _, path = _saved(tmp_path)
    bad = _rewrite(path, tmp_path / "bad.npz", mutate_arch, mutate_arrays)
    with pytest.raises(ModelFileError, match=match):
        convnet.load(bad)


def test_files_that_are_not_models(tmp_path):
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("hello, I am not a model\n")
    np.savez(tmp_path / "badjson.npz", __architecture__=np.array("{not json"))
    for name, match in [("plain.npz", "no '__architecture__' entry"), ("array.npy", "not an .npz archive"),
                        ("text.npz", "truncated or corrupted"), ("badjson.npz", "JSON is corrupted")]:
        with pytest.raises(ModelFileError, match=match):
            convnet.load(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convnet.load(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="directory"):
        convnet.lenet().save(tmp_path / "no" / "such" / "dir.npz")
