"""fit / evaluate, determinism, divergence handling, losses and optimizers."""

import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convnet
from convnet import _blas, optim
from convnet import functional as F
from convnet import layers as L
from convnet.datasets import random_shift
from convnet.gradcheck import numerical_gradient
from convnet.layers import Parameter
from convnet.losses import CrossEntropyLoss, MSELoss
from convnet.model import Sequential
from convnet.optim import SGD, Adam, cosine_schedule
from convnet.training import TrainingDivergedError, confusion_matrix, evaluate, fit, format_epoch, limit_blas_threads


@pytest.fixture(scope="module")
def digits():
    x_train, y_train, x_test, y_test = convnet.datasets.load_mnist_5k()
    return x_train[:240], y_train[:240], x_test[:100], y_test[:100]


def small_cnn(seed=0):
    rng = np.random.default_rng(seed)
    return Sequential(L.Conv2d(1, 4, 5, stride=2, rng=rng), L.ReLU(), L.MaxPool2d(2), L.Flatten(),
                      L.Dropout(0.2, rng=seed), L.Linear(4 * 6 * 6, 10, rng=rng))


def test_same_seed_gives_bit_identical_weights(digits):
    x, y, _, _ = digits
    runs = []
    for seed in (3, 3, 4):
        model = small_cnn(seed=0)
        fit(model, x, y, epochs=2, batch_size=16, optimizer=Adam(1e-3), seed=seed, progress=False)
        runs.append([p.data.copy() for p in model.parameters()])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_augmentation_and_lr_schedule(digits):
    x, y, _, _ = digits
    seen_batches, lrs, opt = [], [], [None]

    def augment(xb, rng):
        seen_batches.append(len(xb))
        lrs.append(opt[0].lr)
        return random_shift(xb, rng)

    runs = []
    for _ in range(2):
        model = small_cnn()
        seen_batches.clear()
        lrs.clear()
        opt[0] = Adam(1e-3)
        fit(model, x, y, epochs=3, batch_size=100, optimizer=opt[0], augment=augment,
            lr_schedule=cosine_schedule(0.01, 3), progress=False)
        runs.append([p.data.copy() for p in model.parameters()])
    assert seen_batches == [100, 100, 40] * 3
    assert lrs[0] == lrs[2] == 0.01 and lrs[3] == pytest.approx(0.0075) and lrs[6] == pytest.approx(0.0025)
    assert all(np.array_equal(a, b) for a, b in zip(*runs))  # augmentation randomness is seeded too
    with pytest.raises(ValueError, match="augment must return an array of shape"):
        fit(small_cnn(), x, y, augment=lambda xb, rng: xb[:, :, 1:], progress=False)
    with pytest.raises(ValueError, match=r"lr_schedule\(1\) must return a positive"):
        fit(small_cnn(), x, y, lr_schedule=lambda e: 0.0, progress=False)


def test_cosine_schedule_values():
    f = cosine_schedule(0.1, 4, min_lr=0.02)
    assert [round(f(e), 6) for e in (1, 2, 3, 4)] == [0.1, round(0.02 + 0.08 * (1 + math.cos(math.pi / 4)) / 2, 6),
                                                      0.06, round(0.02 + 0.08 * (1 + math.cos(3 * math.pi / 4)) / 2, 6)]
    with pytest.raises(ValueError, match="epochs"):
        cosine_schedule(0.1, 0)


def test_blas_threads_are_limited_during_training(digits, monkeypatch):
    import threadpoolctl

    monkeypatch.delenv(_blas.THREADS_ENV, raising=False)  # the default policy, not the tests' fixed count

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy's BLAS should be visible to threadpoolctl"
    during = []
    x, y, _, _ = digits
    fit(small_cnn(), x[:32], y[:32], epochs=1, batch_size=32, progress=False, blas_threads=1,
        on_epoch_end=lambda rec: during.extend(blas_threads()))
    assert set(during) == {1} and blas_threads() == before
    with limit_blas_threads(None):
        assert blas_threads() == before

    class Spy(L.ReLU):
        def forward(self, x):
            during.append(blas_threads())
            return super().forward(x)

    during.clear()
    model = Sequential(L.Flatten(), Spy())
    model.predict(x[:2], blas_threads=1)
    model.predict(x[:2])  # the default: the thread policy's choice for numpy's pool, at most its size
    assert during[0] == [1] * len(before)
    numpy_pool = [p["filepath"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"].index(
        _blas.backend().library)
    assert during[1][numpy_pool] == _blas.policy().threads <= before[numpy_pool]
    assert blas_threads() == before
    with pytest.raises(ValueError, match="blas_threads"):
        fit(small_cnn(), x, y, blas_threads=0, progress=False)
    with pytest.raises(ValueError, match="blas_threads"):
        model.predict(x[:2], blas_threads="fast")


def test_environment_sets_the_default_threads(digits, monkeypatch):
    import threadpoolctl

    x = digits[0]
    seen = []

    class Spy(L.ReLU):
        def forward(self, x):
            seen.extend(p["num_threads"] for p in threadpoolctl.threadpool_info()
                        if p["filepath"] == _blas.backend().library)
            return super().forward(x)

    monkeypatch.setenv(_blas.THREADS_ENV, "1")
    Sequential(L.Flatten(), Spy()).predict(x[:2])
    assert seen == [1]
    monkeypatch.setenv(_blas.THREADS_ENV, "0")
    with pytest.raises(ValueError, match=_blas.THREADS_ENV):
        Sequential(L.Flatten(), Spy()).predict(x[:2])


def test_auto_threads_follow_the_load_step_by_step(digits, monkeypatch):
    """fit consults the policy every step: fake readings, idle then loaded, drive the pool."""
    monkeypatch.delenv(_blas.THREADS_ENV, raising=False)  # the default policy, not the tests' fixed count
    if _blas.get_num_threads() is None or _blas.get_num_threads() < 2 or _blas.usable_cpus() < 2:
        pytest.skip("needs a controllable BLAS pool of at least 2 threads on 2 CPUs")
    state = {"now": 0.0, "busy": 0.0, "others": 0.0}

    def clock():  # every reading of the clock is 0.3 s later: each step may re-decide
        state["now"] += 0.3
        state["busy"] += 0.3 * state["others"]
        return state["now"]

    applied = []

    def apply(n):
        applied.append(n)
        _blas.set_num_threads(n)

    # Every reader is fake (the runnable count too), so the machine's real load cannot steer it.
    fake = _blas.ThreadPolicy(cpus=2, busy=lambda: state["busy"], own=lambda: 0.0, demand=lambda: state["others"],
                              clock=clock, apply=apply)
    monkeypatch.setattr(_blas, "_POLICY", fake)
    pool = []

    def on_step(layer_x):
        pool.append(_blas.get_num_threads())
        if len(pool) == 4:
            state["others"] = 1.5  # other processes start using the machine

    class Spy(L.ReLU):
        def forward(self, x):
            on_step(x)
            return super().forward(x)

    x, y, _, _ = digits
    before = _blas.get_num_threads()
    model = Sequential(L.Conv2d(1, 2, 3, rng=0), Spy(), L.Flatten(), L.Linear(2 * 26 * 26, 10, rng=1))
    fit(model, x[:256], y[:256], epochs=1, batch_size=32, progress=False)
    assert applied == [2, 1]  # idle, then loaded; applied only when the choice changes
    assert pool[:4] == [2, 2, 2, 2] and pool[-1] == 1 and len(pool) == 8
    assert _blas.get_num_threads() == before


def test_history_format_and_validation_split(digits):
    x, y, _, _ = digits
    seen = []
    history = fit(small_cnn(), x, y, epochs=3, batch_size=32, validation_split=0.25, progress=False,
                  on_epoch_end=seen.append)
    assert seen == history and [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert set(h) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "time"}
        assert h["loss"] > 0 and 0 <= h["accuracy"] <= 1 and 0 <= h["val_accuracy"] <= 1
        assert h["val_loss"] > 0 and h["time"] > 0
    assert history[-1]["loss"] < history[0]["loss"]
    plain = fit(small_cnn(), x, y, epochs=1, progress=False)
    assert plain[0]["val_loss"] is None and plain[0]["val_accuracy"] is None


def test_fit_learns_and_evaluate_agrees_with_predictions(digits):
    x, y, xt, yt = digits
    model = small_cnn()
    fit(model, x, y, epochs=6, batch_size=16, optimizer=Adam(3e-3), progress=False)
    result = evaluate(model, xt, yt)
    pred = model.predict(xt).argmax(1)
    assert np.array_equal(result["predictions"], pred)
    assert result["accuracy"] == pytest.approx(np.mean(pred == yt))
    assert result["accuracy"] > 0.6  # chance is 0.1
    m = confusion_matrix(yt, pred, 10)
    assert m.shape == (10, 10) and m.sum() == len(yt) and np.trace(m) == np.sum(pred == yt)
    assert m[yt[0], pred[0]] >= 1


class _NanOnCall(CrossEntropyLoss):
    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, logits, labels):
        self.calls += 1
        return math.nan if self.calls == self.bad_call else super().forward(logits, labels)


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(digits, tmp_path):
    x, y, _, _ = digits
    ckpt = tmp_path / "ckpt.npz"
    steps = math.ceil(len(x) / 32)
    with pytest.raises(TrainingDivergedError, match=f"epoch 2, step 3 of {steps}") as info:
        fit(small_cnn(), x, y, epochs=3, batch_size=32, loss=_NanOnCall(steps + 3), checkpoint=ckpt,
            progress=False)
    assert (info.value.epoch, info.value.step) == (2, 3)
    assert "epoch 1" in str(info.value) and "untouched" in str(info.value)
    saved = convnet.load(ckpt)  # the epoch-1 checkpoint is intact and loads
    assert all(np.isfinite(p.data).all() for p in saved.parameters())
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_non_finite_weights_are_never_checkpointed(digits, tmp_path):
    x, y, _, _ = digits
    ckpt = tmp_path / "ckpt.npz"
    small_cnn(seed=9).save(ckpt)
    before = ckpt.read_bytes()

    class Exploding(SGD):
        def step(self, parameters):
            super().step(parameters)
            parameters[0].data[0, 0, 0, 0] = np.inf

    with pytest.raises(TrainingDivergedError, match="epoch 1"):
        fit(small_cnn(), x[:20], y[:20], epochs=1, batch_size=20, optimizer=Exploding(0.1), checkpoint=ckpt,
            progress=False)
    assert ckpt.read_bytes() == before


def test_really_diverging_training_is_caught(digits):
    x, y, _, _ = digits
    x = x.copy()
    x[40, 0, 10, 10] = np.nan  # the sample poisons the loss in the batch that contains it
    with pytest.raises(TrainingDivergedError, match=r"loss is (nan|inf) at epoch 1, step 3 of") as info:
        fit(small_cnn(), x, y, epochs=1, batch_size=16, shuffle=False, progress=False)
    # the data is to blame, not the learning rate
    assert "training sample 40 holds NaN or infinite values" in str(info.value)
    assert "try a lower learning rate" not in str(info.value)
    x[40, 0, 10, 10] = 0
    x[7, 0, 3, 3] = -np.inf  # after a validation split the index still names the row of x
    with pytest.raises(TrainingDivergedError, match="training sample 7 holds NaN or infinite"):
        fit(small_cnn(), x, y, epochs=1, batch_size=16, validation_split=0.25, seed=1, progress=False)


def test_huge_learning_rate_diverges_quietly(digits, recwarn):
    x, y, _, _ = digits
    with pytest.raises(TrainingDivergedError, match="try a lower learning rate"):
        fit(small_cnn(), x, y, epochs=2, batch_size=16, optimizer=SGD(1e30), progress=False)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_non_finite_regression_targets_are_named(digits):
    x, _, _, _ = digits
    model = Sequential(L.Flatten(), L.Linear(28 * 28, 2, rng=0))
    targets = np.zeros((len(x), 2), np.float32)
    targets[5, 1] = np.nan
    with pytest.raises(TrainingDivergedError, match="training sample 5 holds NaN"):
        fit(model, x, targets, loss=MSELoss(), epochs=1, batch_size=8, shuffle=False, progress=False)


def test_non_finite_augmentation_is_named(digits):
    x, y, _, _ = digits
    with pytest.raises(TrainingDivergedError, match="augment returned NaN or infinite values"):
        fit(small_cnn(), x, y, epochs=1, augment=lambda xb, rng: xb * np.float32(np.nan), progress=False)


def test_non_finite_validation_data_is_reported_before_training(digits):
    x, y, x_val, y_val = digits
    x_val = x_val.copy()
    x_val[13, 0, 0, 0] = np.inf
    seen = []
    with pytest.raises(ValueError, match=r"validation data holds NaN or infinite values \(sample 13 of "
                                         r"validation_data\)"):
        fit(small_cnn(), x, y, epochs=1, validation_data=(x_val, y_val), on_epoch_end=seen.append,
            progress=False)
    x = x.copy()
    x[:, 0, 5, 5] = np.nan  # every sample: the held-out ones are found before training starts
    with pytest.raises(ValueError, match=r"validation data holds NaN .*\(sample \d+ of x, held out by "
                                         r"validation_split\)"):
        fit(small_cnn(), x, y, epochs=1, validation_split=0.25, seed=3, on_epoch_end=seen.append,
            progress=False)
    assert seen == []


def test_progress_bar_only_when_asked(digits, capsys):
    x, y, _, _ = digits
    fit(small_cnn(), x[:64], y[:64], epochs=1, batch_size=16, progress=False)
    assert capsys.readouterr().err == ""
    fit(small_cnn(), x[:64], y[:64], epochs=1, batch_size=16, progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1:" in err and "0/4" in err  # the bar
    assert err.rstrip().splitlines()[-1].startswith("epoch 1/1: loss ")  # the epoch's line stays


def test_format_epoch():
    rec = {"epoch": 3, "loss": 0.21444, "accuracy": 0.9345, "val_loss": None, "val_accuracy": None, "time": 2.21}
    assert format_epoch(rec, 15) == "epoch 3/15: loss 0.2144, accuracy 93.45% (2.2s)"
    rec.update(val_loss=0.3, val_accuracy=0.9, accuracy=None)
    assert format_epoch(rec) == "epoch 3: loss 0.2144, val_loss 0.3000, val_accuracy 90.00% (2.2s)"


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(epochs=0), ValueError, "epochs"),
    (dict(batch_size=-2), ValueError, "batch_size"),
    (dict(validation_split=1.0), ValueError, "validation_split"),
    (dict(validation_split=0.001), ValueError, "validation"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(checkpoint="/no/such/dir/m.npz"), FileNotFoundError, "checkpoint directory"),
])
def test_fit_rejects_bad_arguments(digits, kwargs, exc, match):
    x, y, _, _ = digits
    with pytest.raises(exc, match=match):
        fit(small_cnn(), x, y, progress=False, **kwargs)


def test_fit_rejects_bad_data(digits):
    x, y, _, _ = digits
    with pytest.raises(ValueError, match="differ in length"):
        fit(small_cnn(), x, y[:-1], progress=False)
    with pytest.raises(TypeError, match="integer class labels"):
        fit(small_cnn(), x, y.astype(np.float32), progress=False)
    with pytest.raises(TypeError, match="float64 but the model's parameters are float32"):
        fit(small_cnn(), x.astype(np.float64), y, progress=False)


# ------------------------------------------------------------------------------ losses

def test_cross_entropy_backward_matches_numerical_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 5))
    labels = np.array([0, 4, 2, 2])
    loss = CrossEntropyLoss()
    value = loss(logits, labels)
    num = numerical_gradient(lambda z: CrossEntropyLoss().forward(z, labels), logits)
    np.testing.assert_allclose(loss.backward(), num, rtol=1e-6, atol=1e-9)
    big = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], np.float32)
    assert math.isfinite(loss(big, np.array([1, 0])))
    assert loss(big, np.array([1, 0])) == pytest.approx((1e4 + 1e4 + math.log(2)) / 2, rel=1e-6)
    assert np.isfinite(loss.backward()).all()
    manual = -np.mean(np.log(np.exp(logits)[np.arange(4), labels] / np.exp(logits).sum(1)))
    assert value == pytest.approx(manual)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.sampled_from([np.float32, np.float64]), st.floats(0.01, 1e3),
       st.integers(0, 2**32 - 1))
def test_cross_entropy_call_and_backward_equal_the_two_softmax_formulation_bit_for_bit(n, k, dtype, scale, seed):
    """The loss keeps its one softmax for backward: the same bits as log_softmax for the
    value and a second softmax for the gradient (the functional API's definitions)."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, k))).astype(dtype)
    labels = rng.integers(0, k, n)
    before = logits.copy()
    loss = CrossEntropyLoss()
    value = loss(logits, labels)
    grad = loss.backward()
    assert value == float(-F.log_softmax(logits, axis=1)[np.arange(n), labels].mean())
    want = F.softmax(logits, axis=1)
    want[np.arange(n), labels] -= 1
    want /= n
    assert grad.dtype == dtype
    np.testing.assert_array_equal(grad, want)
    np.testing.assert_array_equal(loss.backward(), want)  # twice: the kept parts are not consumed
    np.testing.assert_array_equal(F.softmax_cross_entropy_backward(logits, labels), want)
    assert F.softmax_cross_entropy(logits, labels) == value
    np.testing.assert_array_equal(logits, before)
    own = _NanOnCall(bad_call=0)  # a subclass with its own forward: its value, the general backward
    assert own(logits, labels) == value
    np.testing.assert_array_equal(own.backward(), want)


def test_mse_loss_and_fit_with_regression_targets():
    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    loss = MSELoss()
    assert loss(pred, target) == pytest.approx(np.mean((pred - target) ** 2))
    num = numerical_gradient(lambda p: MSELoss().forward(p, target), pred)
    np.testing.assert_allclose(loss.backward(), num, rtol=1e-6, atol=1e-9)
    x = rng.standard_normal((64, 3)).astype(np.float32)
    y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32)).astype(np.float32)
    model = Sequential(L.Linear(3, 1, rng=0))
    hist = fit(model, x, y, loss=MSELoss(), epochs=60, batch_size=16, optimizer=SGD(0.1), progress=False)
    assert hist[-1]["accuracy"] is None and hist[-1]["loss"] < 1e-4
    np.testing.assert_allclose(model[0].weight, [[1.0, -2.0, 0.5]], atol=1e-2)


def test_loss_backward_before_forward():
    with pytest.raises(RuntimeError, match="before"):
        CrossEntropyLoss().backward()


# ------------------------------------------------------------------------------ optimizers

def _param(value, grad):
    return Parameter("w", np.array(value, dtype=np.float64), np.array(grad, dtype=np.float64))


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01),
                                                     (0.5, False, 0.1)])
def test_sgd_follows_the_pytorch_update_rule(momentum, nesterov, wd):
    p = _param([1.0, -2.0], [0.0, 0.0])
    data_id = id(p.data)
    opt = SGD(lr=0.1, momentum=momentum, weight_decay=wd, nesterov=nesterov)
    w, buf = np.array([1.0, -2.0]), None
    for g in ([0.5, 1.0], [-0.2, 0.3], [0.1, 0.1]):
        p.grad[...] = g
        opt.step([p])
        d = np.array(g) + wd * w
        if momentum:
            buf = d.copy() if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        w = w - 0.1 * d
        np.testing.assert_allclose(p.data, w, rtol=1e-12)
    assert id(p.data) == data_id  # updated in place


def test_adam_follows_the_pytorch_update_rule():
    p = _param([1.0, -2.0, 0.5], [0, 0, 0])
    opt = Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    w, m, v = p.data.copy(), np.zeros(3), np.zeros(3)
    for t, g in enumerate(([0.5, 1.0, -3.0], [-0.2, 0.3, 0.0], [0.1, 0.1, 2.0]), start=1):
        p.grad[...] = g
        opt.step([p])
        d = np.array(g) + 0.05 * w
        m = 0.8 * m + 0.2 * d
        v = 0.99 * v + 0.01 * d * d
        w = w - 0.01 / (1 - 0.8 ** t) * m / (np.sqrt(v) / np.sqrt(1 - 0.99 ** t) + 1e-6)
        np.testing.assert_allclose(p.data, w, rtol=1e-12)


class _StepByStepAdam(Adam):
    def _step_all(self, params):
        return False


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam_in_one_pass_equals_step_by_step_bit_for_bit(dtype, wd, compiled, monkeypatch):
    """Both routes of the one pass (numba's kernel where installed, numpy's passes) give
    the step-by-step update's bits."""
    if compiled:
        assert optim._jit.available(), "numba is part of the test extra"
        monkeypatch.setattr(optim._jit, "WARMUP_CALLS", 0)
    else:
        monkeypatch.setattr(optim._jit, "ready", lambda: False)
    rng = np.random.default_rng(0)
    shapes = [(4, 3, 2, 2), (4,), (5, 7), (1,)]

    def params():
        return [Parameter(f"{i}.w", rng.standard_normal(s).astype(dtype), np.zeros(s, dtype))
                for i, s in enumerate(shapes)]

    a, b = params(), params()
    for p, q in zip(a, b):
        q.data[...] = p.data
    fast, slow = Adam(lr=0.01, weight_decay=wd), _StepByStepAdam(lr=0.01, weight_decay=wd)
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad[...] = q.grad[...] = rng.standard_normal(p.grad.shape)
        fast.step(a)
        slow.step(b)
        for p, q in zip(a, b):
            np.testing.assert_array_equal(p.data, q.data)
    flat = optim._FLAT.get(fast)
    assert flat is not None and "_flat" not in vars(fast)  # the one-pass route ran; config untouched
    for p in a:  # the per-name state is still there, as views of the flat moments
        st, ref = fast.state[p.name], slow.state[p.name]
        assert st["step"] == ref["step"] == 4 and np.shares_memory(st["m"], flat["m"])
        np.testing.assert_array_equal(st["m"], ref["m"])
        np.testing.assert_array_equal(st["v"], ref["v"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3), min_size=2, max_size=5),
       st.floats(1e-4, 0.1), st.floats(0.0, 0.99), st.floats(0.5, 0.9999), st.floats(1e-10, 1e-3),
       st.sampled_from([0.0, 0.01]), st.integers(0, 2**32 - 1))
def test_adam_in_one_pass_follows_the_textbook_formula(shapes, lr, b1, b2, eps, wd, seed):
    """The flat route (two or more parameters) against Kingma & Ba with bias correction,
    written out in float64 per parameter."""
    rng = np.random.default_rng(seed)
    params = [Parameter(f"{i}.w", rng.standard_normal(sh), np.zeros(sh)) for i, sh in enumerate(shapes)]
    w = [p.data.copy() for p in params]
    m, v = [np.zeros(sh) for sh in shapes], [np.zeros(sh) for sh in shapes]
    opt = Adam(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    for t in range(1, 5):
        for i, p in enumerate(params):
            p.grad[...] = rng.standard_normal(p.grad.shape)
            g = p.grad + wd * w[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            w[i] = w[i] - lr * m_hat / (np.sqrt(v_hat) + eps)
        opt.step(params)
        for p, want in zip(params, w):
            np.testing.assert_allclose(p.data, want, rtol=1e-9, atol=1e-12)
    assert optim._FLAT.get(opt) is not None  # the one-pass route ran


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.sampled_from([np.float32, np.float64]), st.floats(0.0, 0.999), st.floats(0.0, 0.9999),
       st.floats(1e-12, 1e-2), st.floats(1e-6, 1.0), st.integers(1, 10**4), st.floats(1e-30, 1e3),
       st.sampled_from([0.0, 1e-4, 0.3]), st.integers(0, 2**32 - 1))
def test_compiled_adam_step_gives_the_numpy_bits(n, dtype, b1, b2, eps, lr, t, scale, wd, seed):
    """numba's one-pass kernel against numpy's passes (the L2 term, 13 passes for the
    moments and the update, the subtraction): the same moments and weights, bit for bit,
    on gradients of any scale (zeros and tiny second moments included)."""
    rng = np.random.default_rng(seed)
    grad = (scale * rng.standard_normal(n)).astype(dtype)
    grad[rng.random(n) < 0.1] = 0
    data = rng.standard_normal(n).astype(dtype)
    m = (scale * rng.standard_normal(n)).astype(dtype)
    v = (scale * scale * rng.random(n)).astype(dtype)
    v[rng.random(n) < 0.1] = 0
    scalars = tuple(dtype(c) for c in (b1, 1 - b1, b2, 1 - b2, math.sqrt(1 - b2 ** t), eps, lr / (1 - b1 ** t)))
    before = grad.copy()
    d1, m1, v1 = data.copy(), m.copy(), v.copy()
    optim._jit.run("optim.adam", grad, d1, m1, v1, dtype(wd), *scalars)
    d2, m2, v2, update = data.copy(), m.copy(), v.copy(), np.empty(n, dtype)
    g = grad + wd * d2 if wd else grad.copy()  # as the numpy route: the L2 term in the arrays' dtype
    optim._adam_numpy(g, m2, v2, update, np.empty(n, dtype), *scalars)
    d2 -= update
    for a, b in ((d1, d2), (m1, m2), (v1, v2)):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(grad, before)


def test_adam_in_one_pass_takes_the_numpy_route_for_weights_it_cannot_view_flat():
    """A parameter whose data is not C-contiguous (a Fortran-ordered array set from outside)
    cannot be updated through a flat view: the numpy passes update it, bit for bit."""
    rng = np.random.default_rng(3)

    def params():
        return [Parameter("a", np.asfortranarray(rng.standard_normal((3, 4))), np.zeros((3, 4))),
                Parameter("b", rng.standard_normal(5), np.zeros(5))]

    a, b = params(), params()
    for p, q in zip(a, b):
        q.data[...] = p.data
    fast, slow = Adam(lr=0.05, weight_decay=0.01), _StepByStepAdam(lr=0.05, weight_decay=0.01)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad[...] = q.grad[...] = rng.standard_normal(p.grad.shape)
        fast.step(a)
        slow.step(b)
    assert not a[0].data.flags.c_contiguous and optim._FLAT.get(fast) is not None
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.data, q.data)


def test_adam_in_one_pass_follows_state_set_from_outside_and_refuses_another_model():
    ps = [_param([1.0, 2.0], [0.5, -0.5]), Parameter("b", np.array([3.0]), np.array([1.0]))]
    opt, ref = Adam(lr=0.1), _StepByStepAdam(lr=0.1)
    qs = [Parameter(p.name, p.data.copy(), p.grad.copy()) for p in ps]
    opt.step(ps)
    ref.step(qs)
    for o in (opt, ref):  # e.g. moments restored from a checkpoint: new arrays
        o.state["b"]["m"] = np.array([0.25])
    opt.step(ps)
    ref.step(qs)
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p.data, q.data)
    with pytest.raises(ValueError, match="different model"):
        opt.step([_param([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]), ps[1]])


def test_optimizer_argument_checks():
    for make, match in [(lambda: SGD(lr=0), "lr"), (lambda: SGD(0.1, momentum=1.0), "momentum"),
                        (lambda: SGD(0.1, nesterov=True), "nesterov"), (lambda: Adam(betas=(0.9,)), "betas"),
                        (lambda: Adam(eps=0), "eps"), (lambda: Adam(weight_decay=-1), "weight_decay")]:
        with pytest.raises((ValueError, TypeError), match=match):
            make()
    opt = Adam()
    opt.step([_param([1.0, 2.0], [1.0, 1.0])])
    with pytest.raises(ValueError, match="different model"):
        opt.step([_param([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])])


class _Interrupt(Exception):
    pass


def _stop_after(epoch):
    def hook(record):
        if record["epoch"] == epoch:
            raise _Interrupt
    return hook


def _weights(model):
    return {p.name: p.data.copy() for p in model.parameters()}


@pytest.mark.parametrize("make_optimizer, split", [
    (lambda: Adam(2e-3), dict(validation_split=0.25)),
    (lambda: SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4), dict()),
])
def test_interrupted_and_resumed_training_ends_with_identical_weights(digits, tmp_path, make_optimizer, split):
    x, y, _, _ = digits
    kwargs = dict(epochs=4, batch_size=24, seed=7, augment=random_shift, lr_schedule=cosine_schedule(2e-3, 4),
                  progress=False, **split)
    full_model = small_cnn(seed=3)  # has a Dropout layer with its own generator
    full = fit(full_model, x, y, optimizer=make_optimizer(), **kwargs)

    ckpt = tmp_path / "ckpt.npz"
    with pytest.raises(_Interrupt):
        fit(small_cnn(seed=3), x, y, optimizer=make_optimizer(), checkpoint=ckpt, on_epoch_end=_stop_after(2),
            **kwargs)
    # A new process would build the model and optimizer afresh: other initial weights do not matter.
    resumed_model = small_cnn(seed=99)
    seen = []
    resumed = fit(resumed_model, x, y, optimizer=make_optimizer(), checkpoint=ckpt, resume_from=ckpt,
                  on_epoch_end=seen.append, **kwargs)
    assert [r["epoch"] for r in seen] == [3, 4]
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed):
        assert {k: v for k, v in a.items() if k != "time"} == {k: v for k, v in b.items() if k != "time"}
    want, got = _weights(full_model), _weights(resumed_model)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    # the final checkpoint is the finished run; resuming it again trains nothing
    again = small_cnn(seed=5)
    assert len(fit(again, x, y, optimizer=make_optimizer(), resume_from=ckpt, **kwargs)) == 4
    assert all(np.array_equal(want[n], w) for n, w in _weights(again).items())
    assert convnet.load(ckpt).num_parameters() == full_model.num_parameters()  # still a model file


def test_interrupt_inside_an_epoch_resumes_from_the_last_completed_one(digits, tmp_path):
    x, y, _, _ = digits
    kwargs = dict(epochs=3, batch_size=16, seed=1, progress=False)
    full_model = small_cnn()
    fit(full_model, x, y, optimizer=Adam(), **kwargs)
    calls = []

    def augment(xb, rng):
        calls.append(1)
        if len(calls) == 15 + 5:  # 15 steps per epoch: step 5 of epoch 2
            raise KeyboardInterrupt
        return xb

    ckpt = tmp_path / "c.npz"
    with pytest.raises(KeyboardInterrupt):
        fit(small_cnn(), x, y, optimizer=Adam(), checkpoint=ckpt, augment=augment, **kwargs)
    with np.load(ckpt) as data:
        assert '"epoch": 1' in str(data["__training__"])
    model = small_cnn(seed=4)
    fit(model, x, y, optimizer=Adam(), checkpoint=ckpt, resume_from=ckpt, augment=lambda xb, rng: xb, **kwargs)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(full_model.parameters(), model.parameters()))


@pytest.fixture
def checkpoint_of_two_epochs(digits, tmp_path):
    x, y, _, _ = digits
    ckpt = tmp_path / "ckpt.npz"
    with pytest.raises(_Interrupt):
        fit(small_cnn(), x, y, epochs=4, seed=2, optimizer=Adam(), checkpoint=ckpt, on_epoch_end=_stop_after(2),
            progress=False)
    return ckpt


@pytest.mark.parametrize("change, match", [
    (dict(batch_size=16), "written with batch_size=32, this run has batch_size=16"),
    (dict(epochs=5), "epochs=4, this run has epochs=5"),
    (dict(epochs=1), "at epoch 2, beyond epochs=1"),
    (dict(seed=3), "seed=2, this run has seed=3"),
    (dict(shuffle=False), "shuffle"),
    (dict(augment=random_shift), "augment"),
    (dict(optimizer=SGD(0.01)), "optimizer Adam"),
    (dict(optimizer=Adam(betas=(0.8, 0.999))), "optimizer Adam"),
    (dict(x=lambda x: x[:-1], y=lambda y: y[:-1]), "samples=240, this run has samples=239"),
    (dict(x=lambda x: x[::-1].copy()), "the training data differ"),
    (dict(model=lambda: small_cnn().astype(np.float64)), "different model"),
])
def test_resume_refuses_a_different_run(digits, checkpoint_of_two_epochs, change, match):
    x, y, _, _ = digits
    change = dict(change)
    x = change.pop("x", lambda a: a)(x)
    y = change.pop("y", lambda a: a)(y)
    model = change.pop("model", small_cnn)()
    x = x.astype(model.dtype)
    before = _weights(model)
    kwargs = dict(epochs=4, seed=2, optimizer=Adam(), progress=False)
    kwargs.update(change)
    with pytest.raises(convnet.training.ResumeError, match=match):
        fit(model, x, y, resume_from=checkpoint_of_two_epochs, **kwargs)
    assert all(np.array_equal(before[n], w) for n, w in _weights(model).items())  # nothing changed


def test_resume_from_files_without_usable_state(digits, tmp_path, checkpoint_of_two_epochs):
    x, y, _, _ = digits
    plain = tmp_path / "plain.npz"
    small_cnn().save(plain)
    with pytest.raises(convnet.training.ResumeError, match="holds no training state"):
        fit(small_cnn(), x, y, epochs=4, seed=2, resume_from=plain, progress=False)
    with pytest.raises(FileNotFoundError):
        fit(small_cnn(), x, y, epochs=4, seed=2, resume_from=tmp_path / "missing.npz", progress=False)
    with np.load(checkpoint_of_two_epochs) as data:
        members = {k: data[k] for k in data.files}
    name = next(k for k in members if k.startswith("__training__/") and k.endswith("/m"))
    moment = members[name]
    members[name] = moment + np.float32(1e-3)  # a tampered optimizer moment
    np.savez(tmp_path / "tampered.npz", **members)
    with pytest.raises(convnet.training.ResumeError, match="checksum mismatch"):
        fit(small_cnn(), x, y, epochs=4, seed=2, resume_from=tmp_path / "tampered.npz", progress=False)
    state = json.loads(str(members["__training__"]))
    state["rng"]["loop"]["shuffle"]["state"]["state"] = "not a number"
    members["__training__"] = np.array(json.dumps(state))
    members[name] = moment
    np.savez(tmp_path / "badrng.npz", **members)
    with pytest.raises(convnet.training.ResumeError, match="generator shuffle"):
        fit(small_cnn(), x, y, epochs=4, seed=2, resume_from=tmp_path / "badrng.npz", progress=False)


def test_confusion_matrix_counts_and_refusals():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2], np.int32))
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert cm.dtype == np.int64
    assert confusion_matrix(np.array([1]), np.array([1]), np.int64(4)).shape == (4, 4)
    assert confusion_matrix(np.array([], np.int64), np.array([], np.int64)).shape == (0, 0)
    assert confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3
    for args, exc, match in [(([0, 1], [0]), ValueError, "same length"),
                             (([0, -1], [0, 1]), ValueError, r"must lie in \[0, 2\), got values from -1 to 1"),
                             (([0, 3], [0, 0], 3), ValueError, r"must lie in \[0, 3\), got values from 0 to 3"),
                             (([0.0, 1.0], [0, 1]), TypeError, "y_true must hold integer class labels"),
                             (([0, 1], [0, 1], True), TypeError, "num_classes must be a positive int")]:
        with pytest.raises(exc, match=match):
            confusion_matrix(*(np.asarray(a) if isinstance(a, list) else a for a in args))
