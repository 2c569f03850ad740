"""Hostile model files: every bad file is one clear error, and no small file makes a big allocation.

The fixtures are built here, small: the architecture JSON and the ``.npy`` headers say
what a hostile file would claim, the bytes behind them are few.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import convnet
from convnet import layers as L
from convnet.model import FORMAT_VERSION, ModelFileError, Sequential
from guards import raised_in_thread, traced_peak_below


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def arch_member(layers, version=FORMAT_VERSION, **extra) -> bytes:
    arch = {"format": "convnet.Sequential", "version": version, "input_shape": None, "layers": layers, **extra}
    return npy(np.array(json.dumps(arch)))


def model_file(path, layers, members=(), compression=zipfile.ZIP_STORED, **arch):
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("__architecture__.npy", arch_member(layers, **arch))
        for name, data in dict(members).items():
            zf.writestr(name + ".npy", data)
    return path


def linear(i, o):
    return {"type": "Linear", "config": {"in_features": i, "out_features": o}}


def conv(c, f, k):
    return {"type": "Conv2d", "config": {"in_channels": c, "out_channels": f, "kernel_size": k}}


def batch_norm(c):
    return {"type": "BatchNorm2d", "config": {"num_features": c}}


def load_small(path, limit=1 << 20):
    """``convnet.load(path)``, asserting it traced less than ``limit`` bytes of memory."""
    with traced_peak_below(limit):
        return convnet.load(path)


@pytest.mark.parametrize("layer", [
    linear(20000, 20000),        # 1.6 GB: used to draw random weights, 4.7 GB and 11 s, before checking
    linear(10**9, 10**9),
    conv(1, 1, 100000),
    conv(10**12, 1, 1),
    batch_norm(10**12),
])
def test_absurd_architectures_cost_nothing_to_refuse(tmp_path, layer):
    path = model_file(tmp_path / "m.npz", [layer])
    assert path.stat().st_size < 2048
    with pytest.raises(ModelFileError, match="weights missing for 0.weight"):
        load_small(path)


@pytest.mark.parametrize("layer, member, shape", [
    (linear(20000, 20000), "0.weight", (20000, 20000)),
    (linear(10**9, 10**9), "0.weight", (10**9, 10**9)),
    (conv(10**12, 1, 1), "0.weight", (1, 10**12, 1, 1)),
])
def test_headers_declaring_what_the_file_does_not_hold(tmp_path, layer, member, shape):
    """The .npy header matches the architecture, but the file holds 16 bytes of it."""
    members = {member: npy_header(shape) + bytes(16), "0.bias": npy_header((shape[0],)) + bytes(16)}
    path = model_file(tmp_path / "m.npz", [layer], members)
    with pytest.raises(ModelFileError, match=rf"member '{member}' declares float32 .* but the archive stores 16"):
        load_small(path)


def test_layers_too_large_to_describe(tmp_path):
    path = model_file(tmp_path / "m.npz", [linear(10**10, 10**10)])
    with pytest.raises(ModelFileError, match=r"layer 0 \(Linear\) has an invalid config .* would take 4e\+20 bytes"):
        load_small(path)


def test_member_header_of_terabytes_is_refused(tmp_path):
    members = {"0.weight": npy_header((10**6, 10**6)) + bytes(16), "0.bias": npy(np.zeros(2, np.float32))}
    path = model_file(tmp_path / "m.npz", [linear(4, 2)], members)
    with pytest.raises(ModelFileError, match=r"'0.weight' declares float32 \(1000000, 1000000\) \(4000000000000 "
                                             r"bytes\), but the archive stores 16 bytes"):
        load_small(path)


def test_unknown_members_are_refused_before_decompressing(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("__architecture__.npy", arch_member([linear(4, 2)]))
        zf.writestr("0.weight.npy", npy(np.zeros((2, 4), np.float32)))
        zf.writestr("0.bias.npy", npy(np.zeros(2, np.float32)))
        with zf.open("junk.npy", "w") as fh:  # 64 MiB of zeros in about 64 KiB
            fh.write(npy_header((64 << 20,), "|u1"))
            for _ in range(64):
                fh.write(bytes(1 << 20))
    with pytest.raises(ModelFileError, match="unexpected weights junk"):
        load_small(path)


@pytest.mark.parametrize("make, match", [
    (lambda: npy(np.array("[" * 100000)), "architecture JSON nests too deeply"),
    (lambda: npy(np.array("{" * 50 + "}")), "architecture JSON is corrupted"),
    (lambda: npy(np.zeros(3)), "architecture entry is not a JSON string"),
    (lambda: npy_header((), "<U10000000") + bytes(16), "'__architecture__' declares <U10000000 ()"),
    (lambda: b"{'format': 'not npy'}", "member '__architecture__' is not in .npy format"),
])
def test_bad_architecture_members(tmp_path, make, match):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("__architecture__.npy", make())
    with pytest.raises(ModelFileError, match=match):
        load_small(path, limit=4 << 20)  # the deep JSON member itself is 400 kB


def test_architecture_beyond_the_size_limit(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("__architecture__.npy", "w") as fh:
        fh.write(npy_header((), "<U4500000"))  # 18 MB of NUL characters in about 18 kB
        for _ in range(18):
            fh.write(bytes(1_000_000))
    with pytest.raises(ModelFileError, match="'__architecture__' is 18000000 bytes, more than the 16777216 allowed"):
        load_small(path)


def test_weight_member_without_npy_format(tmp_path):
    members = {"0.weight": b"raw float bytes, no header", "0.bias": npy(np.zeros(2, np.float32))}
    with pytest.raises(ModelFileError, match="member '0.weight' is not in .npy format"):
        load_small(model_file(tmp_path / "m.npz", [linear(4, 2)], members))


def test_checksum_is_required_in_the_current_version(tmp_path):
    model = Sequential(L.Linear(4, 2, rng=0))
    weights = {"0.weight": npy(model[0].weight + 1), "0.bias": npy(model[0].bias)}  # modified, no checksum
    with pytest.raises(ModelFileError, match=r"checksum \(sha256\) is missing"):
        load_small(model_file(tmp_path / "v2.npz", [linear(4, 2)], weights))
    # Version 1 files predate the requirement and still load.
    old = convnet.load(model_file(tmp_path / "v1.npz", [linear(4, 2)], weights, version=1))
    np.testing.assert_array_equal(old[0].weight, model[0].weight + 1)


def test_loading_allocates_once_and_never_draws_random_weights(tmp_path, monkeypatch):
    model = Sequential(L.Conv2d(3, 8, 3, rng=0), L.BatchNorm2d(8), L.Flatten(), L.Linear(8 * 4 * 4, 5, rng=1),
                       input_shape=(3, 6, 6))
    model.save(tmp_path / "m.npz")

    real_init = L._pytorch_uniform

    def only_placeholders(*args, **kwargs):
        assert L._SKELETON.get(), "load drew random initial weights"
        return real_init(*args, **kwargs)

    monkeypatch.setattr(L, "_pytorch_uniform", only_placeholders)
    loaded = convnet.load(tmp_path / "m.npz")
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    for p in loaded.parameters():  # real, writable arrays with their own gradients
        assert p.data.flags.writeable and p.data.flags.owndata and p.grad.shape == p.data.shape
        assert not np.shares_memory(p.data, p.grad)
    for _, b in loaded.named_buffers():
        assert b.flags.writeable


def test_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "m.npz"
    Sequential(L.Linear(4, 2, rng=0)).save(path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make the open fail as it would for a user
        real_open = os.open

        def denied(p, *args, **kwargs):
            if os.fspath(p) == str(path):
                raise PermissionError(13, "Permission denied", os.fspath(p))
            return real_open(p, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    with pytest.raises(PermissionError) as info:
        convnet.load(path)
    assert info.value.filename == str(path) and "corrupted" not in str(info.value)
    from convnet import cli

    assert cli.main(["summary", str(path)]) == 1


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "m.npz"
    os.mkfifo(fifo)
    exc = raised_in_thread(lambda: convnet.load(fifo), "load")
    assert isinstance(exc, ModelFileError) and "not a regular file" in str(exc)


def test_summary_refuses_a_sample_too_large_to_run():
    model = Sequential(L.Conv2d(1, 2, 3, rng=0))
    with pytest.raises(ValueError, match=r"input_shape \(1, 1000000, 1000000\) is too large for summary\(\)"):
        model.summary(input_shape=[1, 10**6, 10**6])


@pytest.mark.parametrize("command", ["summary", "evaluate"])
def test_cli_says_one_line_for_each_bad_file(tmp_path, command):
    cases = {
        "absurd.npz": (model_file(tmp_path / "absurd.npz", [linear(10**9, 10**9)]), "weights missing"),
        "deep.npz": (model_file(tmp_path / "deep.npz", []), None),
        "tb.npz": (model_file(tmp_path / "tb.npz", [linear(4, 2)], {"0.weight": npy_header((10**6, 10**6)),
                                                                    "0.bias": npy(np.zeros(2, np.float32))}),
                   "declares float32 (1000000, 1000000)"),
    }
    with zipfile.ZipFile(tmp_path / "deep.npz", "w") as zf:
        zf.writestr("__architecture__.npy", npy(np.array("[" * 100000)))
    cases["deep.npz"] = (tmp_path / "deep.npz", "nests too deeply")
    big = Sequential(L.Flatten(), input_shape=(1, 10**6, 10**6))
    big.save(tmp_path / "big.npz")
    if command == "summary":
        cases["big.npz"] = (tmp_path / "big.npz", "too large for summary()")
    os.mkfifo(tmp_path / "fifo.npz")
    cases["fifo.npz"] = (tmp_path / "fifo.npz", "not a regular file")
    script = (f"import sys; from convnet import cli\n"
              f"for name in {sorted(cases)!r}:\n"
              f"    print('#', name, file=sys.stderr, flush=True)\n"
              f"    print('exit', cli.main([{command!r}, name]), file=sys.stderr, flush=True)\n")
    env = {k: v for k, v in os.environ.items() if k != "CONVNET_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    blocks = proc.stderr.split("# ")[1:]
    assert [b.split("\n")[0] for b in blocks] == sorted(cases)
    for block in blocks:
        name, error, status = block.rstrip("\n").split("\n")
        assert status == "exit 1"
        assert error.startswith(f"convnet {command}: error: ") and cases[name][1] in error, error
