"""state_dict / load_state_dict under PyTorch's names, .safetensors files, and (with torch) both ways to torch."""

import json

import numpy as np
import pytest
import safetensors.numpy

import convnet
from convnet import layers as L
from convnet import weights
from convnet.model import Sequential


def net(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return Sequential(
        L.Conv2d(1, 4, 3, padding=1, rng=rng, dtype=dtype), L.ReLU(), L.MaxPool2d(2),
        L.Conv2d(4, 6, (3, 2), stride=(1, 2), rng=rng, dtype=dtype), L.Tanh(), L.AvgPool2d(2, padding=1),
        L.Flatten(), L.Dropout(0.3), L.Linear(6 * 2 * 2, 5, rng=rng, dtype=dtype), L.LeakyReLU(0.1),
        L.Linear(5, 3, bias=False, rng=rng, dtype=dtype),
        input_shape=(1, 8, 8))


def x_batch(n=4, dtype=np.float32):
    return np.random.default_rng(9).standard_normal((n, 1, 8, 8)).astype(dtype)


def test_state_dict_uses_pytorch_names_in_order_and_copies():
    model = net()
    sd = model.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "3.weight", "3.bias", "8.weight", "8.bias", "10.weight"]
    assert sd["3.weight"].shape == (6, 4, 3, 2) and sd["0.weight"].dtype == np.float32
    assert np.array_equal(sd["8.weight"], model[8].weight)
    sd["0.weight"][...] = 7  # a copy: the model is untouched
    assert not np.any(model[0].weight == 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_state_dict_makes_another_model_predict_the_same(dtype):
    a, b = net(0, dtype), net(1, dtype)
    x = x_batch(dtype=dtype)
    assert not np.array_equal(a.predict(x), b.predict(x))
    keys = b.load_state_dict(a.state_dict())
    assert keys == ([], []) and keys.missing_keys == []
    assert np.array_equal(a.predict(x), b.predict(x))


def test_load_state_dict_checks_everything_before_copying():
    model = net()
    before = model.state_dict()
    good = net(1).state_dict()

    def attempt(state, error, *fragments, strict=True):
        with pytest.raises(error) as info:
            model.load_state_dict(state, strict=strict)
        for f in fragments:
            assert f in str(info.value), str(info.value)
        for name, value in model.state_dict().items():  # nothing half-done
            assert np.array_equal(value, before[name]), name

    attempt({k: v for k, v in good.items() if k != "3.bias"}, ValueError, "missing 3.bias")
    attempt({**good, "11.weight": np.zeros(2, np.float32)}, ValueError, "unexpected 11.weight")
    attempt({**good, "8.weight": np.zeros((5, 23), np.float32)}, ValueError, "'8.weight' has shape (5, 23)",
            "model's is (5, 24)")
    attempt({**good, "10.weight": good["10.weight"].astype(np.float64)}, TypeError, "'10.weight' has dtype float64")
    attempt({**good, "8.weight": np.zeros((5, 23), np.float32)}, ValueError, "shape", strict=False)
    attempt([1, 2], TypeError, "mapping")
    attempt({0: 1}, TypeError, "keys must be strings")


def test_load_state_dict_non_strict_reports_what_it_skipped():
    model = net()
    state = net(1).state_dict()
    del state["0.bias"]
    state["extra"] = np.zeros(1, np.float32)
    keys = model.load_state_dict(state, strict=False)
    assert keys.missing_keys == ["0.bias"] and keys.unexpected_keys == ["extra"]
    assert np.array_equal(model[0].weight, state["0.weight"])


def test_safetensors_round_trip_and_library_compatibility(tmp_path):
    model, other = net(0), net(1)
    path = tmp_path / "w.safetensors"
    weights.save_safetensors(model, path, metadata={"format": "pt"})
    plain = safetensors.numpy.load_file(str(path))  # the library reads it as is
    assert set(plain) == set(model.state_dict())
    assert set(weights.read_safetensors(path)) == set(model.state_dict())
    assert weights.load_safetensors(other, path) == ([], [])
    assert np.array_equal(other.predict(x_batch()), model.predict(x_batch()))
    # Files written by the library (as torch users do) load too.
    path2 = tmp_path / "lib.safetensors"
    safetensors.numpy.save_file(net(2).state_dict(), str(path2))
    weights.load_safetensors(other, path2)
    assert np.array_equal(other.predict(x_batch()), net(2).predict(x_batch()))


def refused(path, *fragments, model=None):
    with pytest.raises(weights.WeightsFileError) as info:
        if model is None:
            weights.read_safetensors(path)
        else:
            weights.load_safetensors(model, path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    for f in fragments:
        assert f in message, message


def test_hostile_safetensors_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    weights.save_safetensors(net(), good)
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:5])
    refused(bad, "only 5 bytes")
    bad.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    refused(bad, "header of 1000000000000 bytes declared")
    bad.write_bytes(data[:-10])
    refused(bad, "malformed safetensors file")
    header = b'{"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}'
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    refused(bad, "'w' has dtype 'BF16'")
    bad.write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    refused(bad, "not a JSON object")
    # A well-formed file that does not fit: the model is left as it was.
    model = net()
    before = model.state_dict()
    wrong = net().state_dict()
    wrong["0.weight"] = np.zeros((4, 1, 5, 5), np.float32)
    weights.save_safetensors(wrong, bad)
    refused(bad, "'0.weight' has shape (4, 1, 5, 5)", model=model)
    assert all(np.array_equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(weights.WeightsFileError, match="more than the limit"):
        weights.read_safetensors(good, max_bytes=100)
    with pytest.raises(FileNotFoundError):
        weights.read_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(weights.WeightsFileError, match="not a regular file"):
        weights.read_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.save_safetensors(net(), tmp_path / "no" / "w.safetensors")


def test_safetensors_header_names_the_tensors_like_torch(tmp_path):
    path = tmp_path / "w.safetensors"
    weights.save_safetensors(convnet.lenet(), path)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert {k: v["shape"] for k, v in header.items() if k != "__metadata__"} == {
        "0.weight": [16, 1, 5, 5], "0.bias": [16], "3.weight": [32, 16, 5, 5], "3.bias": [32],
        "8.weight": [128, 800], "8.bias": [128], "10.weight": [10, 128], "10.bias": [10]}
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")


# -- with torch installed (the bench extra): the same network in PyTorch, weights both ways -----

def torch_net(torch):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, (3, 2), stride=(1, 2)), nn.Tanh(), nn.AvgPool2d(2, padding=1),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(24, 5), nn.LeakyReLU(0.1), nn.Linear(5, 3, bias=False))


def test_weights_move_both_ways_between_convnet_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    x = x_batch(6)
    ours = net(0)
    theirs = torch_net(torch).eval()
    path = tmp_path / "convnet.safetensors"
    weights.save_safetensors(ours, path)
    theirs.load_state_dict(safetensors.torch.load_file(str(path)), strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.from_numpy(x)).numpy(), ours.predict(x), rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    fresh = torch_net(torch).eval()
    back = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(fresh.state_dict(), str(back))
    assert weights.load_safetensors(ours, back) == ([], [])
    with torch.no_grad():
        expected = fresh(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours.predict(x), expected, rtol=1e-5, atol=1e-6)
    # And directly, without a file: torch tensors convert through numpy.asarray.
    ours2 = net(3)
    ours2.load_state_dict(fresh.state_dict())
    np.testing.assert_allclose(ours2.predict(x), expected, rtol=1e-5, atol=1e-6)
