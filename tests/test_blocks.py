"""BatchNorm2d/1d, AdaptiveAvgPool2d and Residual layers; nesting in Sequential (names,
modes, gradients, buffers, summary) and saving and loading nested models."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import convnet
import convnet.functional as F
from convnet import layers as L
from convnet.gradcheck import check_gradient
from convnet.losses import CrossEntropyLoss
from convnet.model import ModelFileError, Sequential
from strategies import readonly

DATA = Path(__file__).parent / "data"


def block(c_in, c_out, stride, rng, dtype=np.float64):
    """A basic residual block with a projection shortcut when the shape changes."""
    body = Sequential(L.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False, rng=rng, dtype=dtype),
                      L.BatchNorm2d(c_out, dtype=dtype), L.ReLU(),
                      L.Conv2d(c_out, c_out, 3, padding=1, bias=False, rng=rng, dtype=dtype),
                      L.BatchNorm2d(c_out, dtype=dtype))
    shortcut = None
    if stride != 1 or c_in != c_out:
        shortcut = Sequential(L.Conv2d(c_in, c_out, 1, stride=stride, bias=False, rng=rng, dtype=dtype),
                              L.BatchNorm2d(c_out, dtype=dtype))
    return L.Residual(body, shortcut)


def small_resnet(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2d(2, 3, 3, padding=1, bias=False, rng=rng, dtype=dtype), L.BatchNorm2d(3, dtype=dtype), L.ReLU(),
        block(3, 3, 1, rng, dtype), L.ReLU(), block(3, 4, 2, rng, dtype), L.ReLU(),
        L.AdaptiveAvgPool2d(1), L.Flatten(), L.Linear(4, 5, rng=rng, dtype=dtype), L.BatchNorm1d(5, dtype=dtype),
        L.Linear(5, 3, rng=rng, dtype=dtype), input_shape=(2, 6, 6))


def randomize_buffers(model, seed=1):
    rng = np.random.default_rng(seed)
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b[...] = rng.standard_normal(b.shape)
        elif name.endswith("running_var"):
            b[...] = rng.uniform(0.5, 2.0, b.shape)


def test_nested_names_are_pytorch_state_dict_names():
    model = small_resnet()
    names = [p.name for p in model.parameters()]
    assert names[:3] == ["0.weight", "1.weight", "1.bias"]
    assert "3.body.0.weight" in names and "3.body.4.bias" in names and "5.shortcut.0.weight" in names
    assert not any(n.startswith("3.shortcut") for n in names)  # identity shortcut: nothing to learn
    buffers = dict(model.named_buffers())
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked", "3.body.1.running_mean",
            "5.shortcut.1.running_var", "10.running_mean"} <= set(buffers)
    assert not set(buffers) & set(names)  # buffers are not parameters
    assert model.num_parameters() == sum(p.data.size for p in model.parameters())


@pytest.mark.parametrize("training, checked", [
    (True, ["0.weight", "3.body.1.bias", "5.body.4.weight", "5.shortcut.0.weight", "9.weight", "10.bias"]),
    (False, ["3.body.1.weight", "5.shortcut.1.bias"]),
])
def test_whole_network_gradients_match_numerical(training, checked):
    """Through residual sums, projection shortcuts, batch norm (batch or running statistics)
    and global pooling: the input gradient and parameters from every kind of place (all of
    them would take a minute)."""
    model = small_resnet()
    randomize_buffers(model)
    model.train(training)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 2, 4, 4))
    y = np.array([0, 2, 1])
    loss_fn = CrossEntropyLoss()
    params = {p.name: p for p in model.parameters()}
    saved = {n: b.copy() for n, b in model.named_buffers()}

    def f(x, **weights):
        for name, value in weights.items():
            params[name].data[...] = value
        for n, b in model.named_buffers():  # batch norm in training moves its running estimates
            b[...] = saved[n]
        return loss_fn.forward(model.forward(x), y)

    model.zero_grad()
    loss_fn(model.forward(x), y)
    dx = model.backward(loss_fn.backward())
    analytic = {"x": dx, **{n: params[n].grad.copy() for n in checked}}
    report = check_gradient(f, {"x": x, **{n: params[n].data.copy() for n in checked}}, analytic,
                            rtol=1e-5, atol=1e-8)
    assert report.ok, str(report)


def test_modes_zero_grad_and_dtype_reach_nested_layers():
    model = small_resnet()
    bn = model[3].body[1]
    model.eval()
    assert not bn.training and not model[5].shortcut[1].training
    model.train()
    assert bn.training
    for p in model.parameters():
        p.grad[...] = 1
    model.zero_grad()
    assert not any(p.grad.any() for p in model.parameters())
    model.astype(np.float32)
    assert bn.weight.dtype == np.float32 and bn.running_var.dtype == np.float32
    assert bn.buffers["num_batches_tracked"].dtype == np.int64
    assert model.dtype == np.float32


def test_batch_norm_layer_tracks_running_statistics_like_pytorch():
    bn = L.BatchNorm2d(2, momentum=0.25, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((5, 2, 3, 3)) * 3 + 1
    rm, rv = np.zeros(2), np.ones(2)
    want = F.batch_norm(x, np.ones(2), np.zeros(2), rm, rv, True, 0.25)
    np.testing.assert_array_equal(bn.forward(x), want)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    assert int(bn.buffers["num_batches_tracked"]) == 1
    bn.eval()
    y = bn.forward(x)
    np.testing.assert_allclose(y, (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + 1e-5))
    assert int(bn.buffers["num_batches_tracked"]) == 1  # eval mode leaves the estimates alone
    np.testing.assert_array_equal(bn.running_mean, rm)


def test_batch_norm_1d_takes_features_and_sequences(rng):
    bn = L.BatchNorm1d(3, affine=False, dtype=np.float64)
    for shape in [(6, 3), (4, 3, 5)]:
        x = readonly(rng.standard_normal(shape))
        y = bn.forward(x)
        assert y.shape == shape
        np.testing.assert_allclose(y.mean(axis=(0, 2) if len(shape) == 3 else 0), 0, atol=1e-12)
        dx = bn.backward(readonly(rng.standard_normal(shape)))
        assert dx.shape == shape
    assert bn.parameters() == []
    with pytest.raises(ValueError, match=r"expected input \(N, C\) or \(N, C, L\) with C=3"):
        bn.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"expected input \(N, 3, H, W\)"):
        L.BatchNorm2d(3).forward(np.zeros((2, 3), np.float32))


def test_optimizers_never_touch_buffers():
    model = small_resnet()
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6))
    loss_fn = CrossEntropyLoss()
    loss_fn(model.forward(x), np.array([0, 1, 2, 0]))
    model.backward(loss_fn.backward())
    before = {n: b.copy() for n, b in model.named_buffers()}
    for opt in (convnet.SGD(0.1, momentum=0.9, weight_decay=0.5), convnet.Adam(0.1, weight_decay=0.5)):
        opt.step(model.parameters())
        assert not any("running" in name or "num_batches" in name for name in opt.state)
    for n, b in model.named_buffers():
        np.testing.assert_array_equal(b, before[n])


def test_residual_adds_the_identity_and_leaves_arrays_alone(rng):
    body = Sequential(L.Conv2d(2, 2, 3, padding=1, rng=0, dtype=np.float64), L.Tanh())
    res = L.Residual(body)
    x = readonly(rng.standard_normal((2, 2, 5, 5)))
    y = res.forward(x)
    np.testing.assert_allclose(y, body.forward(x) + x)
    dy = readonly(rng.standard_normal(y.shape))
    dx = res.backward(dy)
    body.forward(x)
    np.testing.assert_allclose(dx, body.backward(dy) + dy)
    # A body whose gradient is dy itself (no layers) must not add into dy.
    flat = L.Residual(Sequential())
    dy2 = rng.standard_normal(x.shape)
    flat.forward(x)
    np.testing.assert_array_equal(flat.backward(dy2), 2 * dy2)
    with pytest.raises(ValueError, match="body output .* and shortcut output .* differ"):
        L.Residual(Sequential(L.Conv2d(2, 3, 1, rng=0, dtype=np.float64))).forward(x)
    with pytest.raises(TypeError, match="body must be a Layer"):
        L.Residual("conv")


def test_skipping_the_input_gradient_through_a_residual_block():
    model = Sequential(block(2, 3, 2, np.random.default_rng(0)), L.Flatten())
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4))
    dy = np.random.default_rng(2).standard_normal((3, 12))
    model.forward(x)
    assert model.backward(dy).shape == x.shape
    full = [p.grad.copy() for p in model.parameters()]
    model.zero_grad()
    model.forward(x)
    assert model.backward(dy, input_grad=False) is None
    for a, p in zip(full, model.parameters()):
        np.testing.assert_allclose(p.grad, a, rtol=1e-12)


def test_summary_shows_nested_layers():
    text = small_resnet().summary(file=open("/dev/null", "w"))
    assert "3: Residual" in text and "3.body: Sequential" in text and "3.body.0: Conv2d(3, 3, 3" in text
    assert "5.shortcut.0: Conv2d(3, 4, 1, stride=2" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line and line[0].isdigit()}
    assert "(N, 4, 3, 3)" in lines["5:"] and "(N, 4, 1, 1)" in lines["7:"]
    assert "(N, 4, 3, 3)" in lines["5.shortcut:"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nested_model_round_trip_keeps_buffers(tmp_path, dtype):
    model = small_resnet(dtype=dtype)
    x = np.random.default_rng(0).standard_normal((4, 2, 6, 6)).astype(dtype)
    for _ in range(3):  # move the running estimates away from their initial values
        model.forward(x)
    model.save(tmp_path / "m.npz")
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        stored = {n[:-4] for n in z.namelist()}
    assert {"3.body.1.running_mean", "5.shortcut.1.running_var", "1.num_batches_tracked"} <= stored
    loaded = convnet.load(tmp_path / "m.npz")
    assert repr(loaded) == repr(model)
    for (n, a), (m, b) in zip(model.named_buffers(), loaded.named_buffers()):
        assert n == m
        np.testing.assert_array_equal(a, b)
    assert int(dict(loaded.named_buffers())["1.num_batches_tracked"]) == 3
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    arch = json.loads(str(np.load(tmp_path / "m.npz")["__architecture__"]))
    assert arch["version"] == 2 and arch["layers"][3]["type"] == "Residual"
    assert arch["layers"][3]["shortcut"] is None and arch["layers"][5]["shortcut"]["type"] == "Sequential"


def test_every_new_layer_round_trips(tmp_path):
    model = Sequential(L.Conv2d(1, 2, 3, rng=0), L.BatchNorm2d(2, eps=1e-3, momentum=0.3, affine=False),
                       L.AdaptiveAvgPool2d((2, 1)), L.Flatten(), L.BatchNorm1d(4, track_running_stats=False),
                       L.Residual(Sequential(L.Linear(4, 4, rng=1)), L.Linear(4, 4, rng=2)))
    model.save(tmp_path / "m.npz")
    loaded = convnet.load(tmp_path / "m.npz")
    assert repr(loaded) == repr(model)
    x = np.random.default_rng(0).random((3, 1, 6, 5), dtype=np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_files_saved_by_version_1_still_load():
    """tests/data/model_v1.npz was written by convnet 0.1.0 (format version 1)."""
    model = convnet.load(DATA / "model_v1.npz")
    io = np.load(DATA / "model_v1_io.npz")
    # Equal up to float32 rounding: the engine may add a window's or a dot product's terms in
    # another order than 0.1.0 did (mean pooling sums along the height, then the width); a
    # weight or layer loaded wrongly would be off by far more.
    np.testing.assert_allclose(model.predict(io["x"]), io["y"], rtol=1e-6, atol=1e-7)


def _rewrite(path, mutate):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arch = json.loads(str(arrays["__architecture__"]))
    mutate(arch, arrays)
    arrays["__architecture__"] = np.array(json.dumps(arch))
    np.savez(path, **arrays)


def _nest(arch, depth):
    spec = {"type": "ReLU", "config": {}}
    for _ in range(depth):
        spec = {"type": "Sequential", "layers": [spec]}
    arch["layers"] = [spec]


@pytest.mark.parametrize("mutate, match", [
    (lambda a, arr: arr.pop("1.running_var"), "weights missing for 1.running_var"),
    (lambda a, arr: arr.__setitem__("1.running_mean", np.zeros(7, np.float32)),
     r"weight 1.running_mean of layer 1 .* expected float32 \(3,\)"),
    (lambda a, arr: a["layers"][3].__setitem__("body", None), "layer 3 \\(Residual\\) has no body"),
    (lambda a, arr: a["layers"][3]["body"]["layers"][0].__setitem__("type", "Nope"),
     "layer 3.body.0 has unknown type 'Nope'"),
    (lambda a, arr: _nest(a, 40), "nests containers more than 32 deep"),
    (lambda a, arr: a.__setitem__("version", 3), "unsupported model file version 3"),
])
def test_bad_nested_files_say_what_is_wrong(tmp_path, mutate, match):
    path = tmp_path / "m.npz"
    small_resnet(dtype=np.float32).save(path)
    _rewrite(path, mutate)
    with pytest.raises(ModelFileError, match=match):
        convnet.load(path)


def test_resumed_training_restores_batch_norm_running_estimates(tmp_path):
    """A ResNet checkpointed after one epoch and resumed ends bit-identical to an
    uninterrupted run, buffers included."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((24, 2, 6, 6)).astype(np.float32), rng.integers(0, 3, 24)
    kwargs = dict(epochs=2, batch_size=8, seed=1, progress=False)

    def make():
        return small_resnet(dtype=np.float32, seed=0)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    full = make()
    convnet.fit(full, x, y, optimizer=convnet.SGD(0.05, momentum=0.9), **kwargs)
    ckpt = tmp_path / "ckpt.npz"
    with pytest.raises(Stop):
        convnet.fit(make(), x, y, optimizer=convnet.SGD(0.05, momentum=0.9), checkpoint=ckpt, on_epoch_end=stop,
                    **kwargs)
    resumed = small_resnet(dtype=np.float32, seed=5)
    convnet.fit(resumed, x, y, optimizer=convnet.SGD(0.05, momentum=0.9), checkpoint=ckpt, resume_from=ckpt,
                **kwargs)
    for (n, a), (m, b) in zip(full.named_buffers(), resumed.named_buffers()):
        assert n == m and np.array_equal(a, b), n
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert np.array_equal(p.data, q.data), p.name


def test_state_dict_of_a_resnet_has_pytorch_names_and_order():
    model = convnet.resnet(8, width=4, rng=0)
    sd = model.state_dict()
    names = list(sd)
    assert names[:7] == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                         "1.num_batches_tracked", "3.body.0.weight"]
    assert "5.shortcut.1.running_var" in names and names[-2:] == ["11.weight", "11.bias"]
    other = convnet.resnet(8, width=4, rng=1)
    other.load_state_dict(sd)
    for (n, a), (m, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n == m and np.array_equal(a, b)
    try:
        import torch
    except Exception:
        return  # the torch round trip needs torch (the bench extra)
    import sys
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    from _network import torch_twin

    twin = torch_twin(convnet.resnet(8, width=4, rng=2), torch)
    assert list(twin.state_dict()) == names  # same names, same order
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    twin.eval()
    np.testing.assert_allclose(model.predict(x), twin(torch.from_numpy(x)).detach().numpy(), rtol=1e-4, atol=1e-4)
