"""fit / evaluate, determinism, divergence handling, losses and optimizers."""

import math
import os

import numpy as np
import pytest

import convnet
from convnet import _blas
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


def test_blas_threads_are_limited_during_training(digits):
    import threadpoolctl

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

    fake = _blas.ThreadPolicy(cpus=2, busy=lambda: state["busy"], own=lambda: 0.0, clock=clock, apply=apply)
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
    with pytest.raises(TrainingDivergedError, match=r"loss is (nan|inf) at epoch 1, step 3 of"):
        fit(small_cnn(), x, y, epochs=1, batch_size=16, shuffle=False, progress=False)


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
