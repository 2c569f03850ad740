"""`convnet predict` and `convnet export` end to end, and the image reader behind predict."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import convnet
import convnet.onnx as cx
from convnet import functional as F
from convnet import layers as L
from convnet import weights
from convnet.inference import InputFileError, read_images, top_k
from test_datasets import idx_bytes


def run_cli(*args, timeout=180):
    env = {k: v for k, v in os.environ.items() if k != "CONVNET_DEBUG"}
    return subprocess.run([sys.executable, "-m", "convnet", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    model = convnet.lenet(rng=5)
    model.save(d / "m.npz")
    x = convnet.datasets.load_mnist_5k().x_test[:6]
    pixels = np.round(x[:, 0] * 255).astype(np.uint8)
    return d, model, pixels


def expected_line(name, logits, k=1):
    probs = F.softmax(logits.astype(np.float64)[None], axis=1)
    classes, p = top_k(probs, k)
    return f"{name}: " + ", ".join(f"{c} ({q:.4f})" for c, q in zip(classes[0], p[0]))


def test_predict_reads_npy_idx_and_pictures_and_matches_the_model(setup):
    d, model, pixels = setup
    np.save(d / "x.npy", pixels[:3])
    (d / "x.idx").write_bytes(idx_bytes(pixels[3:5]))
    Image.fromarray(pixels[5]).save(d / "five.png")
    Image.fromarray(pixels[5]).save(d / "five.jpg", quality=100)
    proc = run_cli("predict", d / "m.npz", d / "x.npy", d / "x.idx", d / "five.png", "--top", "3")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    logits = model.predict(pixels[:, None].astype(np.float32) / np.float32(255))
    want = [expected_line(f"{d / 'x.npy'}[{i}]", logits[i], 3) for i in range(3)]
    want += [expected_line(f"{d / 'x.idx'}[{i}]", logits[3 + i], 3) for i in range(2)]
    want += [expected_line(str(d / "five.png"), logits[5], 3)]
    assert proc.stdout.splitlines() == want


def test_pictures_take_the_model_channels_and_size_with_training_scaling(setup, tmp_path):
    _, model, pixels = setup
    big = Image.fromarray(pixels[0]).resize((56, 70)).convert("RGB")
    big.save(tmp_path / "big.png")
    x = read_images(tmp_path / "big.png", (1, 28, 28))
    want = np.asarray(big.convert("L").resize((28, 28), Image.Resampling.BILINEAR), np.float32) / np.float32(255)
    assert x.shape == (1, 1, 28, 28) and x.dtype == np.float32 and np.array_equal(x[0, 0], want)
    inverted = read_images(tmp_path / "big.png", (1, 28, 28), invert=True)
    np.testing.assert_allclose(inverted, 1 - x)
    rgb = read_images(tmp_path / "big.png", (3, 32, 32), np.float64)
    assert rgb.shape == (1, 3, 32, 32) and rgb.dtype == np.float64 and rgb.max() <= 1
    # A model without input_shape takes pictures at their own size.
    assert read_images(tmp_path / "big.png", (1, None, None)).shape == (1, 1, 70, 56)


def test_array_layouts(tmp_path):
    rgb = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "chw.npy", rgb)
    assert np.array_equal(read_images(tmp_path / "chw.npy", (3, 8, 8))[0], rgb)
    np.save(tmp_path / "hw.npy", rgb[0].astype(np.float64))
    assert read_images(tmp_path / "hw.npy", (1, 8, 8)).dtype == np.float32
    np.save(tmp_path / "nchw.npy", np.stack([rgb, rgb]))
    assert read_images(tmp_path / "nchw.npy", (3, None, None)).shape == (2, 3, 8, 8)


def test_predict_json_lines(setup):
    d, model, pixels = setup
    np.save(d / "two.npy", pixels[:2])
    proc = run_cli("predict", d / "m.npz", d / "two.npy", d / "missing.png", "--json", "--top", "2")
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records[0] == {"input": str(d / "missing.png"), "error": f"{d / 'missing.png'}: no such file"}
    logits = model.predict(pixels[:2, None].astype(np.float32) / np.float32(255))
    for i, rec in enumerate(records[1:]):
        assert rec["input"] == f"{d / 'two.npy'}[{i}]" and rec["class"] == int(logits[i].argmax())
        assert [t["class"] for t in rec["top"]] == list(np.argsort(-logits[i], kind="stable")[:2])
        assert rec["probability"] == pytest.approx(float(F.softmax(logits[i:i + 1], axis=1).max()), rel=1e-6)


def npy_header(shape):
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_bad_files_get_one_line_each_and_the_others_are_still_predicted(setup, tmp_path):
    d, _, pixels = setup
    np.save(tmp_path / "good.npy", pixels[:1])
    bad = {
        "trunc.png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
        "text.txt": b"hello, not an image",
        "lies.npy": npy_header((100000, 1, 28, 28)) + b"\0" * 64,  # a header promising 300 MB
        "object.npy": None,
        "short.idx": idx_bytes(pixels[:2])[:-10],
        "wrong_size.npy": np.zeros((2, 20, 20), np.uint8),
        "nan.npy": np.full((1, 28, 28), np.nan, np.float32),
        "ints.npy": np.zeros((1, 28, 28), np.int32),
    }
    for name, content in bad.items():
        if name == "object.npy":
            np.save(tmp_path / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        elif isinstance(content, np.ndarray):
            np.save(tmp_path / name, content)
        else:
            (tmp_path / name).write_bytes(content)
    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "pipe.npy")  # must not block waiting for a writer
    names = [*bad, "dir.png", "pipe.npy"]
    proc = run_cli("predict", d / "m.npz", *(tmp_path / n for n in names), tmp_path / "good.npy")
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if "good.npy" in line] != []
    errors = proc.stderr.splitlines()
    assert len(errors) == len(names) and "Traceback" not in proc.stderr
    for name, line in zip(names, errors):
        assert line.startswith(f"convnet predict: error: {tmp_path / name}: "), line
    joined = "\n".join(errors)
    for fragment in ("corrupted or truncated PNG", "not a picture, .npy or IDX", "declares shape (100000, 1, 28, 28)",
                     "dtype object", "truncated", "do not fit the model, which takes (1, 28, 28)", "NaN",
                     "dtype int32", "not a regular file (a directory)", "pipe.npy: not a regular file"):
        assert fragment in joined, fragment


def test_picture_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    from convnet import inference

    Image.new("L", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(inference, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(InputFileError, match="300x300 pixels is larger than the limit"):
        read_images(tmp_path / "big.png", (1, 28, 28))


def test_mean_and_std_normalize_per_channel(tmp_path):
    model = convnet.Sequential(L.Conv2d(3, 4, 3, rng=0), L.Flatten(), L.Linear(4 * 6 * 6, 5, rng=1),
                               input_shape=(3, 8, 8))
    model.save(tmp_path / "rgb.npz")
    x = np.random.default_rng(0).random((2, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mean, std = np.array([0.5, 0.4, 0.3], np.float32), np.array([0.25, 0.2, 0.5], np.float32)
    proc = run_cli("predict", tmp_path / "rgb.npz", tmp_path / "x.npy", "--mean", "0.5,0.4,0.3",
                   "--std", "0.25,0.2,0.5", "--top", "5")
    assert proc.returncode == 0, proc.stderr
    logits = model.predict((x - mean[:, None, None]) / std[:, None, None])
    assert proc.stdout.splitlines() == [expected_line(f"{tmp_path / 'x.npy'}[{i}]", logits[i], 5) for i in range(2)]
    for args, fragment in ((["--mean", "0.5,0.4"], "--mean needs 1 or 3 values"), (["--std", "0"], "positive"),
                           (["--mean", "a"], "numbers separated by commas")):
        bad = run_cli("predict", tmp_path / "rgb.npz", tmp_path / "x.npy", *args)
        assert bad.returncode == 2 and fragment in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_predict_usage_errors(setup):
    d, _, _ = setup
    proc = run_cli("predict", d / "m.npz")
    assert proc.returncode == 2 and "INPUT" in proc.stderr
    proc = run_cli("predict", d / "nope.npz", d / "x.npy")
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1 and "nope.npz" in proc.stderr
    proc = run_cli("predict", d / "m.npz", d / "x.npy", "--top", "0")
    assert proc.returncode == 2 and "--top" in proc.stderr


def test_export_writes_onnx_and_safetensors_that_load_back(setup, tmp_path):
    d, model, pixels = setup
    proc = run_cli("export", d / "m.npz", "--onnx", tmp_path / "m.onnx", "--safetensors", tmp_path / "m.safetensors",
                   "--opset", "18")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"wrote {tmp_path / 'm.onnx'} (ONNX, opset 18)",
                                        f"wrote {tmp_path / 'm.safetensors'} (8 tensors under PyTorch's "
                                        f"state_dict names)"]
    x = pixels[:, None].astype(np.float32) / np.float32(255)
    assert np.array_equal(cx.load(tmp_path / "m.onnx").predict(x), model.predict(x))
    other = convnet.lenet(rng=99)
    weights.load_safetensors(other, tmp_path / "m.safetensors")
    assert np.array_equal(other.predict(x), model.predict(x))
    # predict takes the ONNX file as the model too
    np.save(tmp_path / "x.npy", pixels[:2])
    a = run_cli("predict", d / "m.npz", tmp_path / "x.npy").stdout
    assert a and run_cli("predict", tmp_path / "m.onnx", tmp_path / "x.npy").stdout == a


def test_export_usage_errors(setup, tmp_path):
    d, _, _ = setup
    for args, fragment in ((["export", d / "m.npz"], "nothing to do"),
                           (["export", d / "m.npz", "--safetensors", tmp_path / "w", "--opset", "17"],
                            "--opset applies to --onnx only"),
                           (["export", d / "m.npz", "--onnx", tmp_path], "is a directory")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = run_cli("export", d / "m.npz", "--onnx", tmp_path / "m.onnx", "--opset", "3")
    assert proc.returncode == 1 and "opset must be an int from 13" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_export_refuses_a_model_without_an_onnx_form(tmp_path):
    class Odd(L.ReLU):
        pass

    with pytest.raises(TypeError, match="no ONNX form for Odd"):
        cx.export(convnet.Sequential(L.Linear(2, 2, rng=0), Odd()), tmp_path / "x.onnx")
