"""convnet.models: the CIFAR ResNets' structure, and a small ResNet with batch norm learning a
generated 10-class image task."""

import numpy as np
import pytest

import convnet
from convnet import layers as L
from convnet.models import resnet


def grating_task(n: int, seed: int, hw: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """10 classes of noisy coloured gratings: class k has its own orientation, frequency and
    colour; the phase is random and the noise (std 0.5) is as large as the signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    rows, cols = np.mgrid[0:hw, 0:hw] / hw
    x = np.empty((n, 3, hw, hw), np.float32)
    for k in range(10):
        idx = np.flatnonzero(y == k)
        angle, freq = np.pi * (k % 5) / 5, 1.5 + 1.5 * (k // 5)
        phase = rng.uniform(0, 2 * np.pi, (len(idx), 1, 1))
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * cols + np.sin(angle) * rows)[None] + phase)
        colour = 0.6 + 0.4 * np.array([np.cos(k), np.sin(k), np.cos(2 * k)])[None, :, None, None]
        x[idx] = wave[:, None] * colour
    x += rng.normal(0, 0.5, x.shape).astype(np.float32)
    return x, y


def test_small_resnet_with_batch_norm_learns_a_10_class_image_task():
    x, y = grating_task(800, 0)
    x_test, y_test = grating_task(400, 1)
    model = resnet(8, width=8, input_shape=(3, 12, 12), rng=0)
    assert sum(isinstance(layer, L.Residual) for layer in model) == 3
    before = convnet.evaluate(model, x_test, y_test)["accuracy"]
    history = convnet.fit(model, x, y, epochs=3, batch_size=32, progress=False, blas_threads=1,
                          optimizer=convnet.SGD(0.1, momentum=0.9, weight_decay=1e-4),
                          lr_schedule=convnet.optim.cosine_schedule(0.1, 3))
    after = convnet.evaluate(model, x_test, y_test)["accuracy"]
    assert before < 0.3
    assert history[-1]["loss"] < history[0]["loss"]
    assert after >= 0.9, (before, after, history)
    # the running estimates moved, and eval mode uses them (a batch of one still works)
    bn = model[1]
    assert not np.allclose(bn.running_var, 1) and int(bn.buffers["num_batches_tracked"]) == 3 * 25
    assert model.predict(x_test[:1]).shape == (1, 10)


@pytest.mark.parametrize("depth, blocks, params", [(8, 3, 78_042), (14, 6, 175_258), (20, 9, 272_474)])
def test_cifar_resnets_have_6n_plus_2_layers(depth, blocks, params):
    model = resnet(depth)
    residual = [layer for layer in model if isinstance(layer, L.Residual)]
    assert len(residual) == blocks
    convs_and_fc = sum(isinstance(m, (L.Conv2d, L.Linear)) for m in _leaves(model))
    projections = sum(r.shortcut is not None for r in residual)
    assert convs_and_fc - projections == depth  # 6n + 2 weighted layers on the main path
    assert projections == 2  # option B: a projection where stages 2 and 3 start
    assert model.num_parameters() == params
    widths = [r.body[0].out_channels for r in residual]
    assert widths == [16] * (blocks // 3) + [32] * (blocks // 3) + [64] * (blocks // 3)
    assert model.predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    text = model.summary(file=open("/dev/null", "w"))  # noqa: SIM115
    assert "(N, 64, 8, 8)" in text and "(N, 64, 1, 1)" in text


def _leaves(layer):
    children = layer.children()
    if not children:
        return [layer]
    return [leaf for _, child in children for leaf in _leaves(child)]


@pytest.mark.parametrize("depth", [0, 9, 10, 7, True, 20.0])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="depth must be"):
        resnet(depth)


def test_width_and_classes():
    model = resnet(8, num_classes=3, width=4, input_shape=(1, 16, 16))
    assert [r.body[0].out_channels for r in model if isinstance(r, L.Residual)] == [4, 8, 16]
    assert model.predict(np.zeros((1, 1, 16, 16), np.float32)).shape == (1, 3)
    assert convnet.models.build("resnet14", 10, (3, 32, 32)).num_parameters() == 175_258
    with pytest.raises(ValueError, match="model must be one of lenet, resnet8"):
        convnet.models.build("vgg", 10, (3, 32, 32))


def test_mobilenet_is_depthwise_separable():
    model = convnet.models.mobilenet()
    convs = [layer for layer in model if isinstance(layer, L.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert len(depthwise) == 6 and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert all(c.weight.shape[1] == 1 for c in depthwise)  # one 3x3 filter per channel
    assert [c.stride for c in depthwise] == [1, 2, 1, 2, 1, 2]
    assert model.num_parameters() == 73_130
    assert model.predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert convnet.models.build("mobilenet", 4, (3, 16, 16)).predict(np.zeros((1, 3, 16, 16), np.float32)).shape \
        == (1, 4)

