"""The CIFAR-10 binary reader (on small generated files) and the CIFAR augmentation."""

import numpy as np
import pytest

from convnet import datasets
from convnet.datasets import CifarFormatError, load_cifar10

NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_cifar(directory, records=7, seed=0):
    """Six batches of ``records`` random records; returns {name: (labels, pixels)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in NAMES:
        labels = rng.integers(0, 10, records, dtype=np.uint8)
        pixels = rng.integers(0, 256, (records, 3072), dtype=np.uint8)
        (directory / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
        written[name] = (labels, pixels)
    return written


def test_reads_the_binary_records_in_order(tmp_path):
    written = write_cifar(tmp_path)
    x_train, y_train, x_test, y_test = load_cifar10(tmp_path)
    assert x_train.shape == (35, 3, 32, 32) and x_test.shape == (7, 3, 32, 32)
    assert x_train.dtype == x_test.dtype == np.float32 and y_train.dtype == y_test.dtype == np.int64
    assert 0 <= x_train.min() and x_train.max() <= 1
    labels = np.concatenate([written[n][0] for n in NAMES[:5]])
    np.testing.assert_array_equal(y_train, labels)
    # record 3 of batch 2: the red plane is its first 1024 pixel bytes, row-major
    pixels = written["data_batch_2.bin"][1][3]
    np.testing.assert_array_equal(x_train[7 + 3, 0], pixels[:1024].reshape(32, 32) / np.float32(255))
    np.testing.assert_array_equal(x_train[7 + 3, 2, 31, 31], pixels[3071] / np.float32(255))
    np.testing.assert_array_equal(y_test, written["test_batch.bin"][0])


def test_finds_the_folder_inside_the_extracted_archive(tmp_path):
    inner = tmp_path / "cifar-10-batches-bin"
    inner.mkdir()
    write_cifar(inner, records=2)
    assert load_cifar10(tmp_path).x_train.shape == (10, 3, 32, 32)


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "data_batch_3.bin").write_bytes((d / "data_batch_3.bin").read_bytes()[:-100]),
     "data_batch_3.bin: 21411 bytes is not a whole number of 3073-byte CIFAR-10 records"),
    (lambda d: (d / "test_batch.bin").write_bytes((d / "test_batch.bin").read_bytes()[:-3073]),
     "batches differ in size .*test_batch.bin 18438 bytes"),
    (lambda d: (d / "data_batch_1.bin").write_bytes(b""), "0 bytes is not a whole number"),
    (lambda d: (d / "data_batch_5.bin").unlink(), "no data_batch_5.bin"),
])
def test_damaged_files_are_named(tmp_path, damage, match):
    write_cifar(tmp_path)
    damage(tmp_path)
    with pytest.raises((CifarFormatError, FileNotFoundError), match=match):
        load_cifar10(tmp_path)


def test_a_label_above_9_is_rejected(tmp_path):
    write_cifar(tmp_path)
    raw = bytearray((tmp_path / "data_batch_4.bin").read_bytes())
    raw[2 * 3073] = 10
    (tmp_path / "data_batch_4.bin").write_bytes(bytes(raw))
    with pytest.raises(CifarFormatError, match="data_batch_4.bin: record 2 has label 10; CIFAR-10 labels are 0-9"):
        load_cifar10(tmp_path)


def test_oversized_files_are_rejected_before_reading(tmp_path, monkeypatch):
    write_cifar(tmp_path, records=3)
    monkeypatch.setattr(datasets, "_CIFAR_MAX_RECORDS", 2)
    monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("read an oversized file"))
    with pytest.raises(CifarFormatError, match="3 records .* holds at most 2"):
        load_cifar10(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(tmp_path / "nope")


def test_crop_and_flip_augmentation(rng):
    x = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6) + 1
    seen_flip = seen_plain = False
    for seed in range(20):
        y = datasets.random_crop_flip(x, np.random.default_rng(seed), padding=2)
        assert y.shape == x.shape and y.dtype == x.dtype
        for n in range(2):
            # every output is a window of the zero-padded (possibly mirrored) image
            for img, flag in ((x[n], False), (x[n, :, :, ::-1], True)):
                padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
                if any(np.array_equal(padded[:, i:i + 6, j:j + 6], y[n]) for i in range(5) for j in range(5)):
                    seen_flip |= flag
                    seen_plain |= not flag
                    break
            else:
                pytest.fail("augmented image is not a crop of the padded image")
    assert seen_flip and seen_plain
    np.testing.assert_array_equal(x[0, 0, 0, 0], 1)  # input untouched


def test_channel_normalization(rng):
    x = rng.random((50, 3, 4, 4)).astype(np.float32) * np.array([1, 2, 3], np.float32)[:, None, None] + 5
    mean, std = datasets.channel_stats(x)
    z = datasets.normalize_channels(x, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-5)
    with pytest.raises(ValueError, match="one value per channel"):
        datasets.normalize_channels(x, mean[:2], std[:2])


def test_command_line_trains_a_resnet_on_cifar_files(tmp_path):
    """``convnet train --dataset cifar10`` end to end on tiny generated files."""
    import subprocess
    import sys

    data = tmp_path / "cifar"
    data.mkdir()
    write_cifar(data, records=4)
    code = ("import sys\nfrom convnet.cli import main\n"
            "sys.exit(main(['train', '--dataset', 'cifar10', '--data', 'cifar', '--model', 'resnet8', "
            "'--epochs', '1', '--batch-size', '8', '--out', 'r.npz']))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("training resnet8 on 20 images from CIFAR-10 binary files in cifar (32x32, ")
    assert "sgd lr 0.1 weight decay 0.0001 with cosine decay" in first
    assert "random crops (4-pixel padding) and flips, channels normalized" in first
    assert "test accuracy:" in r.stdout
    import convnet
    model = convnet.load(tmp_path / "r.npz")
    assert type(model[3]).__name__ == "Residual" and model.input_shape == (3, 32, 32)


def test_command_line_cifar_needs_its_data(tmp_path):
    from convnet.cli import main

    assert main(["train", "--dataset", "cifar10"]) == 2
    data = tmp_path / "bad"
    data.mkdir()
    write_cifar(data, records=2)
    (data / "test_batch.bin").write_bytes(b"\x0b" + bytes(3072) + b"\x00" + bytes(3072))
    assert main(["train", "--dataset", "cifar10", "--data", str(data), "--out", str(tmp_path / "m.npz")]) == 1
