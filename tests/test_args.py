"""The shared scalar checks (convnet._args) and the public arguments that go through them.

numpy scalars are numbers everywhere; bools are not; every refusal names the argument and
shows the value.
"""

import math

import numpy as np
import pytest

import convnet.functional as F
from convnet import _args, datasets, reference
from convnet import layers as L
from convnet.gradcheck import check_gradient, numerical_gradient
from convnet.model import Sequential
from convnet.optim import SGD, Adam, cosine_schedule
from convnet.training import fit

INTS = [3, np.int8(3), np.int32(3), np.int64(3), np.uint16(3)]
REALS = [0.5, np.float16(0.5), np.float32(0.5), np.float64(0.5)]
NOT_NUMBERS = [True, False, np.bool_(True), "3", None, [3], (3,), 3 + 0j, np.array([3])]


@pytest.mark.parametrize("value", INTS, ids=repr)
def test_integers_of_every_kind_are_ints(value):
    for check in (_args.positive_int, _args.non_negative_int, _args.integer):
        out = check(value, "n")
        assert out == 3 and type(out) is int
    assert _args.pair(value, "stride", 1) == (3, 3)
    assert _args.pair((value, value), "stride", 1) == (3, 3)


@pytest.mark.parametrize("value", REALS + INTS, ids=repr)
def test_reals_of_every_kind_are_python_floats(value):
    for out in (_args.real(value, "x"), _args.real(value, "x", 0.0, 5.0, finite=True)):
        assert type(out) is float and out == float(value)
    if value == 0.5:
        assert _args.probability(value, "p") == 0.5


@pytest.mark.parametrize("value", NOT_NUMBERS, ids=repr)
def test_bools_and_non_numbers_are_refused_with_the_name_and_value(value):
    checks = [lambda v: _args.positive_int(v, "epochs"), lambda v: _args.integer(v, "epochs", 0, 9),
              lambda v: _args.real(v, "epochs"), lambda v: _args.real(v, "epochs", 0.0, low_open=True),
              lambda v: _args.probability(v, "epochs"), lambda v: _args.pair(v, "epochs", 1)]
    for check in checks:
        with pytest.raises(TypeError, match=r"^epochs must be .*, got ") as info:
            check(value)
        assert str(info.value).endswith(repr(value))
        assert isinstance(info.value, ValueError)  # callers that catch ValueError still catch it


@pytest.mark.parametrize("call, message", [
    (lambda: _args.positive_int(0, "epochs"), "epochs must be a positive int, got 0"),
    (lambda: _args.positive_int(np.int64(-2), "epochs"), "epochs must be a positive int, got np.int64(-2)"),
    (lambda: _args.non_negative_int(-1, "seed"), "seed must be a non-negative int, got -1"),
    (lambda: _args.integer(12, "index", 0, 11), r"index must be an int in [0, 11], got 12"),
    (lambda: _args.real(0, "lr", 0.0, low_open=True), "lr must be a positive number, got 0"),
    (lambda: _args.real(-1e-9, "atol", 0.0, finite=True), "atol must be a non-negative finite number, got -1e-09"),
    (lambda: _args.real(math.inf, "atol", 0.0, finite=True), "atol must be a non-negative finite number, got inf"),
    (lambda: _args.real(math.nan, "slope", finite=True), "slope must be a finite real number, got nan"),
    (lambda: _args.real(math.nan, "momentum", 0.0, 1.0, high_open=True),
     "momentum must be a number in [0, 1), got nan"),
    (lambda: _args.real(1.0, "momentum", 0.0, 1.0, high_open=True), "momentum must be a number in [0, 1), got 1.0"),
    (lambda: _args.probability(np.float32(1), "p"), "p must be a probability in [0, 1), got np.float32(1.0)"),
    (lambda: _args.choice("fft", "algo", ("auto", "im2col", "taps")),
     "algo must be 'auto', 'im2col' or 'taps', got 'fft'"),
    (lambda: _args.choice(["auto"], "algo", ("auto",)), "algo must be 'auto', got ['auto']"),
])
def test_out_of_range_values_are_value_errors_that_say_what_is_expected(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == message


def test_choice_returns_the_choice():
    assert _args.choice("taps", "algo", ("auto", "im2col", "taps")) == "taps"


# --------------------------------------------------------------------------- through the public API

def test_dropout_takes_a_numpy_probability():
    x = np.ones((4, 50), np.float32)
    y, mask = F.dropout(x, np.float32(0.5), np.random.default_rng(3))
    y_ref, mask_ref = F.dropout(x, 0.5, np.random.default_rng(3))
    np.testing.assert_array_equal(mask, mask_ref)
    np.testing.assert_array_equal(y, y_ref)
    assert y.dtype == np.float32 and set(np.unique(mask)) == {0.0, 2.0}
    assert L.Dropout(np.float64(0.25)).p == 0.25
    for bad, exc, match in [(True, TypeError, r"p must be a probability in \[0, 1\), got True"),
                            (1.0, ValueError, r"p must be a probability in \[0, 1\), got 1.0"),
                            ("0.5", TypeError, "got '0.5'")]:
        with pytest.raises(exc, match=match):
            F.dropout(x, bad, np.random.default_rng(0))
        with pytest.raises(exc, match=match):
            L.Dropout(bad)


def test_numpy_scalars_are_accepted_by_layers_optimizers_and_training():
    conv = L.Conv2d(np.int64(1), np.int32(2), np.int64(3), stride=np.int64(1), padding=np.int8(1), rng=np.int64(0))
    assert (conv.in_channels, conv.out_channels) == (1, 2) and type(conv.in_channels) is int
    lin = L.Linear(np.int64(8), np.uint8(3), rng=0)
    assert (lin.in_features, lin.out_features) == (8, 3)
    assert L.LeakyReLU(np.float32(0.1)).negative_slope == pytest.approx(0.1)
    pool = L.MaxPool2d(np.int64(2), padding=np.int64(1))
    assert pool.forward(np.zeros((1, 1, 4, 4))).shape == (1, 1, 3, 3)
    sgd = SGD(lr=np.float32(0.5), momentum=np.float64(0.5), weight_decay=np.int64(0))
    assert (sgd.lr, sgd.momentum) == (0.5, 0.5) and type(sgd.lr) is float
    adam = Adam(lr=np.float64(1e-3), betas=(np.float32(0.5), np.float64(0.25)), eps=np.float32(0.5))
    assert adam.betas == (0.5, 0.25) and adam.eps == 0.5
    assert cosine_schedule(np.float32(1.0), np.int64(2))(1) == 1.0

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 1, 4, 4)), rng.integers(0, 2, 8)
    model = Sequential(L.Conv2d(1, 2, 3, rng=0, dtype=np.float64), L.Flatten(), L.Linear(8, 2, rng=1, dtype=np.float64))
    history = fit(model, x, y, epochs=np.int64(2), batch_size=np.int32(4), validation_split=np.float32(0.25),
                  seed=np.int64(1), optimizer=SGD(0.1), progress=False)
    assert len(history) == 2 and history[-1]["val_loss"] is not None
    assert model.predict(x, batch_size=np.int64(3)).shape == (8, 2)
    assert datasets.random_shift(x, np.random.default_rng(0), max_shift=np.int64(1)).shape == x.shape

    xs = np.linspace(-1, 1, 5)
    for mod in (F, reference):
        np.testing.assert_array_equal(mod.leaky_relu(xs, np.float32(0.5)), np.where(xs > 0, xs, 0.5 * xs))
    g = numerical_gradient(lambda v: float(np.sum(v ** 2)), xs.copy(), eps=np.float32(1e-3))
    np.testing.assert_allclose(g, 2 * xs, atol=1e-6)
    assert check_gradient(lambda v: np.sum(v ** 2), [xs], [2 * xs], rtol=np.float32(1e-5), atol=np.int64(0)).ok


@pytest.mark.parametrize("make, match", [
    (lambda: L.Conv2d(True, 2, 3), "in_channels must be a positive int, got True"),
    (lambda: L.Linear(3, np.bool_(True)), "out_features must be a positive int, got np.True_"),
    (lambda: L.LeakyReLU(False), "negative_slope must be a finite real number, got False"),
    (lambda: L.LeakyReLU(float("inf")), "negative_slope must be a finite real number, got inf"),
    (lambda: L.MaxPool2d(True), "kernel_size must be an int or a pair of ints, got True"),
    (lambda: L.AvgPool2d(2, padding="same"), "padding for pooling must be an int or a pair, got 'same'"),
    (lambda: L.AvgPool2d(2, padding=2), "padding must be at most half of kernel_size"),
    (lambda: SGD(lr=True), "lr must be a positive finite number, got True"),
    (lambda: SGD(0.1, momentum=np.float32("nan")), r"momentum must be a finite number in \[0, 1\)"),
    (lambda: cosine_schedule(0.1, True), "epochs must be a positive int, got True"),
    (lambda: reference.leaky_relu(np.zeros(2), True), "negative_slope must be a real number, got True"),
    (lambda: numerical_gradient(np.sum, np.ones(2), eps=True), "eps must be a positive finite number, got True"),
    (lambda: check_gradient(np.sum, [np.ones(2)], [np.ones(2)], atol=-1),
     "atol must be a non-negative finite number, got -1"),
])
def test_bools_and_bad_values_are_refused_by_the_public_api(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_fit_refuses_bool_sizes_before_training():
    model = Sequential(L.Flatten(), L.Linear(4, 2, rng=0, dtype=np.float64))
    x, y = np.zeros((4, 1, 2, 2)), np.zeros(4, np.int64)
    for kwargs, match in [({"epochs": True}, "epochs must be a positive int, got True"),
                          ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
                          ({"validation_split": 1}, r"validation_split must be a number in \[0, 1\), got 1"),
                          ({"seed": -1}, "seed must be a non-negative int, got -1"),
                          ({"seed": False}, "seed must be a non-negative int, got False")]:
        before = model[1].params["weight"].copy()
        with pytest.raises((TypeError, ValueError), match=match):
            fit(model, x, y, progress=False, **kwargs)
        np.testing.assert_array_equal(model[1].params["weight"], before)


def test_flags_are_bools_only():
    assert _args.flag(np.bool_(False), "bias") is False and _args.flag(True, "bias") is True
    for bad in (1, 0, "yes", None, np.array([True])):
        with pytest.raises(TypeError, match=r"^bias must be True or False, got "):
            _args.flag(bad, "bias")
    for make in (lambda: L.Conv2d(1, 2, 3, bias=1), lambda: L.Linear(2, 2, bias="no"),
                 lambda: L.ConvTranspose2d(1, 2, 3, bias=None)):
        with pytest.raises(TypeError, match="bias must be True or False"):
            make()
    with pytest.raises(TypeError, match="nesterov must be True or False, got 1"):
        SGD(0.1, momentum=0.9, nesterov=1)
    assert SGD(0.1, momentum=0.9, nesterov=np.bool_(True)).nesterov is True
