"""Layers: backward against numerical gradients, PyTorch-style init, caching, modes, errors."""

import math

import numpy as np
import pytest

import convnet.functional as F
from convnet import layers as L
from convnet.gradcheck import check_backward
from convnet.model import Sequential


def _check_layer(layer, x, seed=0, rtol=1e-6, atol=1e-8, reseed=None):
    """Compare a layer's backward (dx and parameter grads) with central differences of
    ``sum(forward(x) * dy)``; ``reseed`` is called before every forward (for Dropout)."""
    layer.astype(np.float64)
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    names = list(layer.params)
    saved = {n: layer.params[n].copy() for n in names}
    if reseed:
        reseed()
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dy)
    assert dx.shape == x.shape and dx.dtype == np.float64
    analytic = {"x": dx, **{n: layer.grads[n].copy() for n in names}}

    def f(x, **params):
        for n, v in params.items():
            layer.params[n][...] = v
        if reseed:
            reseed()
        return layer.forward(x)

    report = check_backward(f, {"x": x, **saved}, dy, analytic, rtol=rtol, atol=atol)
    for n in names:
        layer.params[n][...] = saved[n]
    assert report.ok, str(report)
    return report


def _randn(*shape, seed=1):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(in_channels=2, out_channels=3, kernel_size=3), (2, 2, 6, 5)),
    (dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), (2, 2, 7, 6)),
    (dict(in_channels=1, out_channels=2, kernel_size=(2, 3), padding="same"), (2, 1, 5, 5)),
    (dict(in_channels=2, out_channels=2, kernel_size=3, dilation=2, padding=2, bias=False), (1, 2, 7, 7)),
    (dict(in_channels=3, out_channels=4, kernel_size=1, stride=(1, 2)), (2, 3, 4, 5)),
])
def test_conv2d_backward_matches_numerical(kwargs, shape):
    layer = L.Conv2d(**kwargs, rng=0)
    _check_layer(layer, _randn(*shape))
    assert ("bias" in layer.params) == kwargs.get("bias", True)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_backward_matches_numerical(bias):
    _check_layer(L.Linear(5, 3, bias=bias, rng=0), _randn(4, 5))


@pytest.mark.parametrize("layer", [
    L.MaxPool2d(2), L.MaxPool2d(3, stride=2, padding=1), L.MaxPool2d((2, 3), stride=(1, 2)),
    L.AvgPool2d(2), L.AvgPool2d(3, stride=2, padding=1),
], ids=repr)
def test_pool_backward_matches_numerical(layer):
    _check_layer(layer, _randn(2, 3, 7, 6))


@pytest.mark.parametrize("layer", [L.ReLU(), L.LeakyReLU(0.1), L.Sigmoid(), L.Tanh(), L.Flatten()], ids=repr)
def test_elementwise_and_flatten_backward_matches_numerical(layer):
    x = _randn(3, 2, 4, 3)
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the ReLU kink
    _check_layer(layer, x)


def test_dropout_backward_matches_numerical_with_fixed_mask():
    layer = L.Dropout(0.4)

    def reseed():
        layer.rng = np.random.default_rng(7)

    _check_layer(layer, _randn(4, 6), reseed=reseed)


def test_linear_and_conv_shapes_follow_pytorch_layouts():
    conv = L.Conv2d(3, 8, (5, 3))
    lin = L.Linear(20, 7)
    assert conv.weight.shape == (8, 3, 5, 3) and conv.bias.shape == (8,)
    assert lin.weight.shape == (7, 20) and lin.bias.shape == (7,)
    assert conv.weight.dtype == np.float32 and conv.weight_grad.shape == conv.weight.shape
    assert L.Linear(2, 2, dtype=np.float64).weight.dtype == np.float64
    y = conv.forward(np.zeros((2, 3, 9, 9), np.float32))
    assert y.shape == (2, 8, 5, 7) and y.dtype == np.float32


@pytest.mark.parametrize("make, fan_in", [
    (lambda rng: L.Conv2d(6, 50, 5, rng=rng), 6 * 25),
    (lambda rng: L.Linear(400, 300, rng=rng), 400),
])
def test_init_is_pytorch_default_uniform(make, fan_in):
    layer = make(0)
    bound = 1 / math.sqrt(fan_in)
    for name in ("weight", "bias"):
        p = layer.params[name]
        assert np.abs(p).max() <= bound
        if p.size > 1000:
            # U(-b, b): fills the range, mean ~0, std b/sqrt(3)
            assert np.abs(p).max() > 0.99 * bound
            assert abs(p.mean()) < 0.05 * bound
            assert abs(p.std() - bound / math.sqrt(3)) < 0.05 * bound
    again = make(np.random.default_rng(0))
    other = make(1)
    assert np.array_equal(layer.weight, again.weight) and np.array_equal(layer.bias, again.bias)
    assert not np.array_equal(layer.weight, other.weight)


def test_conv_backward_reuses_the_forward_im2col_cache(monkeypatch):
    layer = L.Conv2d(2, 3, 3, padding=1, rng=0)
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 5)).astype(np.float32)
    y = layer.forward(x)
    cache = layer._cache
    assert isinstance(cache, F.ConvCache) and cache.algo == "im2col" and cache.data.shape == (3 * 3 * 2, 2 * 5 * 5)
    seen = {}
    real = F.conv2d_backward

    def spy(*args, **kwargs):
        seen["cache"] = kwargs.get("cache")
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "conv2d_backward", spy)
    layer.backward(np.ones_like(y))
    assert seen["cache"] is cache


def test_gradients_accumulate_until_zero_grad():
    layer = L.Linear(3, 2, rng=0)
    x = np.ones((4, 3), np.float32)
    dy = np.ones((4, 2), np.float32)
    layer.forward(x)
    layer.backward(dy)
    once = layer.weight_grad.copy()
    layer.backward(dy)
    np.testing.assert_allclose(layer.weight_grad, 2 * once)
    layer.zero_grad()
    assert not layer.weight_grad.any() and not layer.bias_grad.any()


def test_dropout_modes():
    x = np.ones((200, 50), np.float32)
    d = L.Dropout(0.25, rng=0)
    y = d.forward(x)
    kept = y != 0
    assert 0.70 < kept.mean() < 0.80
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(d.backward(x), y)
    d.eval()
    assert d.forward(x) is x and d.backward(x) is x
    assert L.Dropout(0.0).forward(x) is x


def test_backward_before_forward_is_a_clear_error():
    for layer in (L.Conv2d(1, 1, 1), L.Linear(1, 1), L.ReLU(), L.MaxPool2d(2), L.Flatten(), L.Dropout(0.5)):
        with pytest.raises(RuntimeError, match="before forward"):
            layer.backward(np.zeros((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("make, match", [
    (lambda: L.Conv2d(0, 4, 3), "in_channels"),
    (lambda: L.Conv2d(1, 4, 0), "kernel_size"),
    (lambda: L.Conv2d(1, 4, 3, stride=2, padding="same"), "same"),
    (lambda: L.Conv2d(1, 4, 3, padding="full"), "padding"),
    (lambda: L.Linear(3, -1), "out_features"),
    (lambda: L.Linear(3, 2, dtype=np.int32), "dtype"),
    (lambda: L.MaxPool2d(2, padding=2), "padding"),
    (lambda: L.Dropout(1.0), "p must"),
    (lambda: L.LeakyReLU(float("nan")), "negative_slope"),
    (lambda: L.Linear(3, 2, rng="seed"), "rng"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_input_mistakes_are_explained():
    with pytest.raises(ValueError, match="Flatten"):
        L.Linear(16, 2).forward(np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="3 channels"):
        L.Conv2d(3, 2, 3).forward(np.zeros((1, 1, 5, 5), np.float32))
    with pytest.raises(TypeError, match="float64 does not match"):
        L.Conv2d(1, 2, 3).forward(np.zeros((1, 1, 5, 5), np.float64))


def test_repr_and_config_round_trip():
    conv = L.Conv2d(1, 8, 5, padding=2)
    assert repr(conv) == "Conv2d(1, 8, 5, padding=2)"
    rebuilt = L.Conv2d(**conv.get_config())
    assert rebuilt.get_config() == conv.get_config()
    assert repr(L.MaxPool2d(2)) == "MaxPool2d(2)" and repr(L.Dropout(0.3)) == "Dropout(p=0.3)"


def _one_of_each():
    """(layer, input) for every saved layer type, in training mode."""
    x4 = _randn(2, 2, 6, 6)
    return [
        (L.Conv2d(2, 3, 3, rng=0, dtype=np.float64), x4), (L.MaxPool2d(2), x4), (L.AvgPool2d(2), x4),
        (L.ReLU(), x4), (L.LeakyReLU(0.1), x4), (L.Sigmoid(), x4), (L.Tanh(), x4), (L.Flatten(), x4),
        (L.Linear(6, 4, rng=0, dtype=np.float64), _randn(3, 6)), (L.Dropout(0.5, rng=0), x4),
        (L.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2, rng=0, dtype=np.float64), x4),
        (L.BatchNorm2d(2, dtype=np.float64), x4), (L.BatchNorm1d(6, dtype=np.float64), _randn(3, 6)),
        (L.AdaptiveAvgPool2d((2, 3)), x4),
        (L.Residual(Sequential(L.Conv2d(2, 2, 3, padding=1, rng=0, dtype=np.float64),
                               L.BatchNorm2d(2, dtype=np.float64)),
                    Sequential(L.Conv2d(2, 2, 1, rng=1, dtype=np.float64))), x4),
    ]


def test_every_layer_type_is_covered_by_the_contract_tests():
    assert {type(layer) for layer, _ in _one_of_each()} == set(L.LAYER_TYPES.values())


@pytest.mark.parametrize("index", range(len(_one_of_each())))
def test_every_layer_keeps_the_backward_contract(index):
    """backward(dy, input_grad=True) is dx; input_grad=False gives the same parameter
    gradients and no dx; clear_cache drops what forward kept, so backward is refused."""
    layer, x = _one_of_each()[index]

    def forward():
        if isinstance(layer, L.Dropout):
            layer.rng = np.random.default_rng(0)  # the same mask every time
        return layer.forward(x)

    y = forward()
    dy = np.random.default_rng(2).standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dy, input_grad=True)
    assert dx.shape == x.shape
    grads = {n: g.copy() for n, g in layer.grads.items()}
    layer.zero_grad()
    assert layer.backward(dy, input_grad=False) is None
    for n, g in layer.grads.items():
        np.testing.assert_array_equal(g, grads[n])
    layer.clear_cache()
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(dy)
    forward()
    np.testing.assert_array_equal(layer.backward(dy), dx)  # a new forward makes backward work again


@pytest.mark.parametrize("make", [
    lambda: L.Conv2d(4, 6, 3, padding=1, groups=2, rng=0, dtype=np.float64),
    lambda: L.Conv2d(4, 8, 3, stride=2, groups=4, bias=False, rng=0, dtype=np.float64),  # depthwise, x2
    lambda: L.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, rng=0, dtype=np.float64),
    lambda: L.ConvTranspose2d(4, 2, (2, 3), stride=(2, 1), dilation=(1, 2), output_padding=(1, 1), rng=0,
                              dtype=np.float64),
])
def test_grouped_and_transposed_layers(make, tmp_path):
    """Numerical gradients, PyTorch's weight layouts and init bound, and a save/load round trip."""
    from convnet import Sequential, load

    layer = make()
    x = _randn(2, 4, 5, 5)
    groups, k = layer.groups, layer.weight.shape[2:]
    if isinstance(layer, L.ConvTranspose2d):
        assert layer.weight.shape == (4, layer.out_channels // groups) + k
        fan_in = layer.out_channels // groups * k[0] * k[1]
    else:
        assert layer.weight.shape == (layer.out_channels, 4 // groups) + k
        fan_in = 4 // groups * k[0] * k[1]
    assert np.abs(layer.weight).max() <= 1 / np.sqrt(fan_in)
    y = layer.forward(x)
    dy = np.random.default_rng(3).standard_normal(y.shape)
    layer.zero_grad()
    dx = layer.backward(dy)
    inputs = {"x": x, **{n: p.copy() for n, p in layer.params.items()}}

    def f(x, **params):
        layer.params.update(params)
        return layer.forward(x)

    report = check_backward(f, inputs, dy, {"x": dx, **layer.grads})
    assert report.ok, report
    config = layer.get_config()
    assert type(layer)(**config).get_config() == config
    model = Sequential(make(), input_shape=(4, 5, 5))
    model.save(tmp_path / "m.npz")
    again = load(tmp_path / "m.npz")
    assert repr(again.layers[0]) == repr(model.layers[0])
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
