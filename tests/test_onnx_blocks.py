"""ONNX for batch norm, residual blocks, nested stacks and adaptive pooling; their state_dict names."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import convnet.onnx as cx
from convnet import layers as L
from convnet import models
from convnet.model import Sequential
from test_onnx import ort_run


def with_running_stats(model, seed=0):
    """Random running estimates, so eval-mode batch norm is not close to the identity."""
    rng = np.random.default_rng(seed)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf[...] = rng.standard_normal(buf.shape)
        elif name.endswith("running_var"):
            buf[...] = rng.uniform(0.5, 2.0, buf.shape)
    for p in model.parameters():
        if p.data.ndim == 1:
            p.data[...] += rng.standard_normal(p.data.shape).astype(p.data.dtype) * 0.1
    return model


def small_resnet(dtype=np.float32):
    rng = np.random.default_rng(1)

    def conv(c, f, k=3, s=1):
        return L.Conv2d(c, f, k, stride=s, padding=k // 2, bias=False, rng=rng, dtype=dtype)

    return with_running_stats(Sequential(
        conv(3, 8), L.BatchNorm2d(8, dtype=dtype), L.ReLU(),
        L.Residual(Sequential(conv(8, 8), L.BatchNorm2d(8, dtype=dtype), L.ReLU(), conv(8, 8),
                              L.BatchNorm2d(8, dtype=dtype))),
        L.ReLU(),
        L.Residual(Sequential(conv(8, 16, s=2), L.BatchNorm2d(16, dtype=dtype), L.ReLU(), conv(16, 16),
                              L.BatchNorm2d(16, dtype=dtype)),
                   Sequential(conv(8, 16, k=1, s=2), L.BatchNorm2d(16, dtype=dtype))),
        L.ReLU(), L.AdaptiveAvgPool2d(1), L.Flatten(), L.Linear(16, 12, rng=rng, dtype=dtype),
        L.BatchNorm1d(12, dtype=dtype), L.Tanh(), L.Linear(12, 5, rng=rng, dtype=dtype),
        input_shape=(3, 12, 12)))


def x_for(model, n=4, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *model.input_shape)).astype(dtype)


def test_resnet_blocks_match_onnx_runtime_and_load_back_exactly(tmp_path):
    model = small_resnet()
    proto = cx.to_onnx(model)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Add") == 2 and ops.count("BatchNormalization") == 7 and "GlobalAveragePool" in ops
    for n in (1, 5):
        x = x_for(model, n, seed=n)
        np.testing.assert_allclose(ort_run(proto, x), model.predict(x), rtol=1e-5, atol=1e-5)
    path = tmp_path / "r.onnx"
    cx.export(model, path)
    back = cx.load(path)
    x = x_for(model, 6)
    assert np.array_equal(back.predict(x), model.predict(x))
    # Same nesting, so the same PyTorch names (num_batches_tracked is not in ONNX: 0 after loading).
    assert list(back.state_dict()) == list(model.state_dict())


def test_float64_blocks_match_the_reference_evaluator():
    model = small_resnet(np.float64)
    x = x_for(model, 3, np.float64)
    theirs = ReferenceEvaluator(cx.to_onnx(model)).run(None, {"input": x})[0]
    np.testing.assert_allclose(theirs, model.predict(x), rtol=1e-9, atol=1e-11)


def test_cifar_resnet_from_the_models_module():
    model = with_running_stats(models.resnet(8))
    x = x_for(model, 2)
    np.testing.assert_allclose(ort_run(cx.to_onnx(model), x), model.predict(x), rtol=1e-4, atol=1e-5)
    assert np.array_equal(cx.from_onnx(cx.to_onnx(model)).predict(x), model.predict(x))


def test_adaptive_pooling_to_a_dividing_size_is_an_average_pool():
    model = Sequential(L.Conv2d(2, 3, 3, padding=1, rng=0), L.AdaptiveAvgPool2d((2, 3)), input_shape=(2, 8, 9))
    proto = cx.to_onnx(model)
    pool = proto.graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in pool.attribute}
    assert pool.op_type == "AveragePool" and attrs["kernel_shape"] == attrs["strides"] == [4, 3]
    x = x_for(model, 3)
    np.testing.assert_allclose(ort_run(proto, x), model.predict(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="do not divide"):
        cx.to_onnx(model, input_shape=(2, 7, 9))
    with pytest.raises(TypeError, match="pass input_shape"):
        cx.to_onnx(Sequential(L.Conv2d(2, 3, 3, rng=0), L.AdaptiveAvgPool2d(2)))


def test_batch_norm_without_running_statistics_has_no_onnx_form():
    model = Sequential(L.Conv2d(1, 2, 3, rng=0), L.BatchNorm2d(2, track_running_stats=False), input_shape=(1, 5, 5))
    with pytest.raises(TypeError, match="without running statistics"):
        cx.to_onnx(model)


def test_state_dict_names_nest_like_pytorch():
    sd = small_resnet().state_dict()
    assert list(sd)[:7] == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                            "1.num_batches_tracked", "3.body.0.weight"]
    assert "5.shortcut.1.running_var" in sd and sd["1.num_batches_tracked"].dtype == np.int64
    other = small_resnet()
    other.load_state_dict(sd)


def chain(nodes, inits, shape=(1, 2, 4, 4)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *shape[1:]])],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_built_residual_graphs(tmp_path):
    w = np.random.default_rng(0).standard_normal((2, 2, 3, 3)).astype(np.float32)
    ok = chain([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"]),
                helper.make_node("Relu", ["y"], ["z"])], {"w": w})
    model = cx.from_onnx(ok)
    assert type(model[0]).__name__ == "Residual" and model[0].shortcut is None and len(model[0].body) == 2
    x = np.random.default_rng(1).standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(model.predict(x), ort_run_any(ok, x), rtol=1e-5, atol=1e-6)
    bad_add = chain([helper.make_node("Add", ["x", "k"], ["y"], name="plus")], {"k": np.ones((1,), np.float32)})
    with pytest.raises(cx.OnnxError, match=r"node 0 \(Add 'plus'\): unsupported Add"):
        cx.from_onnx(bad_add)
    dangling = chain([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
                      helper.make_node("Tanh", ["a"], ["y"])], {})
    with pytest.raises(cx.OnnxError, match="does not end in an Add"):
        cx.from_onnx(dangling)


def ort_run_any(proto, x):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    s = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_checker_accepts_the_block_graph():
    onnx.checker.check_model(cx.to_onnx(small_resnet()), full_check=True)


def test_nested_blocks_move_to_torch_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    from convnet import weights

    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, body, shortcut=None):
            super().__init__()
            self.body, self.shortcut = body, shortcut

        def forward(self, x):
            return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    def conv(c, f, k=3, s=1):
        return nn.Conv2d(c, f, k, stride=s, padding=k // 2, bias=False)

    twin = nn.Sequential(
        conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(),
        Residual(nn.Sequential(conv(8, 8), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 8), nn.BatchNorm2d(8))), nn.ReLU(),
        Residual(nn.Sequential(conv(8, 16, s=2), nn.BatchNorm2d(16), nn.ReLU(), conv(16, 16), nn.BatchNorm2d(16)),
                 nn.Sequential(conv(8, 16, k=1, s=2), nn.BatchNorm2d(16))),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.Tanh(),
        nn.Linear(12, 5)).eval()
    ours = small_resnet()
    assert list(twin.state_dict()) == list(ours.state_dict())  # the same names, in the same order
    path = tmp_path / "ours.safetensors"
    weights.save_safetensors(ours, path)
    twin.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    x = x_for(ours, 4)
    with torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), ours.predict(x), rtol=1e-4, atol=1e-5)
    # Back: torch's trained-looking weights into a fresh convnet model.
    with torch.no_grad():
        for name, buf in twin.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh = small_resnet()
    fresh.load_state_dict(twin.state_dict())
    with torch.no_grad():
        np.testing.assert_allclose(fresh.predict(x), twin(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5)
