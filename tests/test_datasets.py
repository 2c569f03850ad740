"""Bundled digits and the IDX reader (on small IDX files built here)."""

import gzip
import io
import os
import struct
from importlib import resources

import numpy as np
import pytest

from convnet import datasets
from convnet.datasets import IdxFormatError, load_idx, load_mnist_idx
from guards import raised_in_thread, traced_peak_below


def idx_bytes(array: np.ndarray, code: int | None = None) -> bytes:
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
             np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}
    code = codes[array.dtype] if code is None else code
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_bundled_digits_split():
    x_train, y_train, x_test, y_test = split = datasets.load_mnist_5k()
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert 0.0 == x_train.min() and x_train.max() == 1.0
    assert np.bincount(y_train).tolist() == [400] * 10 and np.bincount(y_test).tolist() == [100] * 10
    assert split.x_test is x_test
    # shuffled: any prefix is a fair sample, not one class
    assert len(np.unique(y_train[:100])) == 10
    # fixed: same split every call; train and test together are exactly the bundled file
    again = datasets.load_mnist_5k()
    assert all(np.array_equal(a, b) for a, b in zip(split, again))
    raw = np.load(resources.files("convnet") / "data" / "mnist_5k.npz")
    key = lambda imgs, labels: sorted(  # noqa: E731
        (int(lab), (img.reshape(-1) * 255).round().astype(np.uint8).tobytes()) for img, lab in zip(imgs, labels))
    both = key(np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test]))
    assert both == sorted((int(lab), img.tobytes()) for img, lab in zip(raw["images"], raw["labels"]))


@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([5, 0, 9], dtype=np.uint8),
    np.array([[-3, 70000], [1, 2]], dtype=np.int32),
    np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
    np.array([-1.5, 2.25]),
    np.array([-7, 8], dtype=np.int16),
])
@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_round_trip(tmp_path, array, compress):
    data = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if compress else "a.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = load_idx(path)
    assert out.shape == array.shape and out.dtype == array.dtype and out.dtype.isnative
    assert np.array_equal(out, array)


def test_gzip_is_detected_by_content_not_name(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    (tmp_path / "plain-but-named.gz").write_bytes(idx_bytes(a))
    (tmp_path / "gzipped-no-suffix").write_bytes(gzip.compress(idx_bytes(a)))
    assert np.array_equal(load_idx(tmp_path / "plain-but-named.gz"), a)
    assert np.array_equal(load_idx(str(tmp_path / "gzipped-no-suffix")), a)


GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize("data, match", [
    (b"", "not an IDX file"),
    (b"\x00\x00", "not an IDX file"),
    (b"\x01\x00\x08\x01" + GOOD[4:], "bad magic number 0x01000801"),
    (b"\x00\x00\x07\x03" + GOOD[4:], "bad magic number"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (GOOD[:10], "truncated IDX header"),
    (GOOD[:-1], r"truncated: header says shape \(2, 3, 4\) of uint8 \(40 bytes in all\), file has 39"),
    (GOOD[:16], "truncated"),
    (GOOD + b"\x00", "trailing bytes"),
    (gzip.compress(GOOD)[:-12], "corrupted or truncated gzip"),
    (b"\x1f\x8b garbage", "corrupted or truncated gzip"),
])
def test_load_idx_rejects_bad_files(tmp_path, data, match):
    path = tmp_path / "bad"
    path.write_bytes(data)
    with pytest.raises(IdxFormatError, match=match):
        load_idx(path)
    assert issubclass(IdxFormatError, ValueError)


def test_load_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_idx(tmp_path / "nope")


def write_mnist_dir(directory, n_train=30, n_test=10, gz=True, size=28, seed=0):
    """Four standard MNIST files with random images; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for i, (name, a) in enumerate(arrays.items()):
        compress = gz and i % 2 == 0  # a mix of raw and .gz files
        (directory / (name + (".gz" if compress else ""))).write_bytes(
            gzip.compress(idx_bytes(a)) if compress else idx_bytes(a))
    return arrays


def test_load_mnist_idx_directory(tmp_path):
    arrays = write_mnist_dir(tmp_path / "mnist")
    x_train, y_train, x_test, y_test = load_mnist_idx(tmp_path / "mnist")
    assert x_train.shape == (30, 1, 28, 28) and x_train.dtype == np.float32
    np.testing.assert_allclose(x_train[:, 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-4)
    assert np.array_equal(y_test, arrays["t10k-labels-idx1-ubyte"]) and y_test.dtype == np.int64
    assert x_test.shape == (10, 1, 28, 28)


def test_load_mnist_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist_idx(tmp_path / "absent")
    write_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(IdxFormatError, match="10 images .* 7 labels"):
        load_mnist_idx(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((10, 2), np.uint8)))
    with pytest.raises(IdxFormatError, match="expected uint8 labels"):
        load_mnist_idx(tmp_path / "d")


def test_random_shift_moves_whole_images_within_range():
    rng = np.random.default_rng(0)
    x = np.zeros((200, 2, 9, 9), np.float32)
    x[:, 0, 4, 4] = 1.0  # a dot in the centre of channel 0, a different dot in channel 1
    x[:, 1, 2, 6] = 2.0
    out = datasets.random_shift(x, rng, max_shift=2)
    assert out.shape == x.shape and out.dtype == np.float32 and x[:, 0, 4, 4].all()  # input untouched
    moves = set()
    for img in out:
        (r0, c0), = np.argwhere(img[0] == 1.0)
        (r1, c1), = np.argwhere(img[1] == 2.0)
        dy, dx = r0 - 4, c0 - 4
        assert (r1 - 2, c1 - 6) == (dy, dx)  # all channels move together
        assert abs(dy) <= 2 and abs(dx) <= 2
        moves.add((dy, dx))
    assert len(moves) == 25  # every shift in [-2, 2]^2 occurs
    edge = np.ones((1, 1, 5, 5), np.float32)
    shifted = datasets.random_shift(edge, np.random.default_rng(3), 1)
    assert shifted.sum() in (25, 20, 16)  # zeros fill the uncovered border
    assert np.array_equal(datasets.random_shift(x, rng, 0), x)


def test_random_shift_rejects_bad_arguments():
    x = np.zeros((2, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="max_shift"):
        datasets.random_shift(x, np.random.default_rng(), 4)
    with pytest.raises(TypeError, match="rng"):
        datasets.random_shift(x, 0)
    with pytest.raises(ValueError, match="N, C, H, W"):
        datasets.random_shift(x[0], np.random.default_rng())


def gzip_stream(header: bytes, zeros: int) -> bytes:
    """Gzip of ``header`` then ``zeros`` zero bytes, built in 1 MiB chunks (never the whole thing)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz:
        gz.write(header)
        chunk = bytes(1 << 20)
        for start in range(0, zeros, len(chunk)):
            gz.write(chunk[:zeros - start])
    return buf.getvalue()


def test_gzip_bomb_is_not_inflated(tmp_path):
    """A 32 KiB file inflating to 32 MiB behind a 40-byte IDX: only header + data + 1 byte are read."""
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_stream(GOOD, 32 << 20))
    assert path.stat().st_size < 64 << 10
    with traced_peak_below(1 << 20), pytest.raises(IdxFormatError, match="trailing bytes"):
        load_idx(path)


@pytest.mark.parametrize("dims, extra, gz, match", [
    ((60000, 28, 28), 8, True, r"header says shape \(60000, 28, 28\) of uint8 \(47040016 bytes in all\), "
                               r"but a gzip file of \d+ bytes inflates to at most"),
    ((60000, 28, 28), 8, False, r"\(47040016 bytes in all\), file has 24 bytes"),
    ((2**32 - 1,) * 3, 8, False, "truncated"),           # the int64 product overflows
    ((2**32 - 1,) * 255, 8, True, "truncated"),
    # 2**31 * 2**31 * 4 = 2**64 wraps to 0 in int64: a header-only file looked complete
    ((2**31, 2**31, 4), 0, False, r"\(18446744073709551632 bytes in all\), file has 16 bytes"),
    ((2**31, 2**31, 4), 0, True, "truncated"),
])
def test_declared_sizes_beyond_the_file_are_rejected_before_allocating(tmp_path, dims, extra, gz, match):
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    data = header + bytes(extra)
    path = tmp_path / "big"
    path.write_bytes(gzip.compress(data) if gz else data)
    with traced_peak_below(1 << 20), pytest.raises(IdxFormatError, match=match):
        load_idx(path)


def test_truncated_gzip_data_is_named(tmp_path):
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(GOOD[:-5]))
    with pytest.raises(IdxFormatError, match=r"truncated: .*\(40 bytes in all\), file has 35 bytes"):
        load_idx(path)


def test_idx_paths_that_are_not_files(tmp_path):
    with pytest.raises(IdxFormatError, match="is a directory"):
        load_idx(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    exc = raised_in_thread(lambda: load_idx(fifo), "load_idx")
    assert isinstance(exc, IdxFormatError) and "not a regular file" in str(exc)


def test_mnist_files_without_images_are_an_error(tmp_path):
    write_mnist_dir(tmp_path / "d")
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((0, 28, 28), np.uint8))))
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0, np.uint8)))
    with pytest.raises(IdxFormatError, match="train-images-idx3-ubyte.gz: holds no images"):
        load_mnist_idx(tmp_path / "d")
    (tmp_path / "d" / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((3, 0, 28), np.uint8))))
    with pytest.raises(IdxFormatError, match="images of 0x28 pixels"):
        load_mnist_idx(tmp_path / "d")


def test_one_part_needs_only_its_files(tmp_path):
    arrays = write_mnist_dir(tmp_path / "d")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte"):
        (tmp_path / "d" / name).unlink()
    x, y = datasets.load_mnist_idx_part(tmp_path / "d", "test")
    assert x.shape == (10, 1, 28, 28) and x.dtype == np.float32
    assert np.array_equal(y, arrays["t10k-labels-idx1-ubyte"]) and y.dtype == np.int64
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load_mnist_idx_part(tmp_path / "d", "train")
    with pytest.raises(ValueError, match="part must be 'train' or 'test', got 'val'"):
        datasets.load_mnist_idx_part(tmp_path / "d", "val")
