"""The checked .npz reader: sizes before allocation, names before decompression, one clear error."""

import io
import os
import zipfile

import numpy as np
import pytest

from convnet._npz import NpzArchive, open_regular_file
from guards import raised_in_thread, traced_peak_below


class Bad(ValueError):
    pass


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, descr="<f4", fortran=False) -> bytes:
    """Only the .npy header: the fixture declares sizes it does not hold."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()


def archive(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_reads_what_numpy_wrote(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array("text"),
              "c": np.asfortranarray(np.arange(6.0).reshape(2, 3)), "d": np.arange(5, dtype=">i4"),
              "e": np.zeros((0, 3), np.float64), "f": np.array(7, np.int64)}
    np.savez(tmp_path / "m.npz", **arrays)
    np.savez_compressed(tmp_path / "z.npz", **arrays)
    for name in ("m.npz", "z.npz"):
        with NpzArchive(tmp_path / name, Bad) as npz:
            assert set(npz.members) == set(arrays)
            for key, want in arrays.items():
                head = npz.header(key)
                assert head.shape == want.shape and head.nbytes == want.nbytes
                got = npz.read_small(key, 1 << 20)
                assert got.dtype == want.dtype.newbyteorder("=") and got.dtype.isnative
                assert np.array_equal(got, want) and got.flags.c_contiguous


def test_unknown_members_are_refused_before_anything_is_decompressed(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.npy", npy(np.zeros(3, np.float32)))
        with zf.open("junk.npy", "w") as fh:  # 64 MiB of zeros in about 64 KiB
            fh.write(npy_header((64 << 20,), "|u1"))
            for _ in range(64):
                fh.write(bytes(1 << 20))
    assert path.stat().st_size < 256 << 10
    with traced_peak_below(1 << 20), NpzArchive(path, Bad) as npz, \
            pytest.raises(Bad, match=r"unexpected members 'junk'"):
        npz.check_names({"w"})


@pytest.mark.parametrize("data, match", [
    (npy_header((10**6, 10**6)) + bytes(16), r"declares float32 \(1000000, 1000000\) \(4000000000000 bytes\), "
                                             r"but the archive stores 16 bytes"),
    (npy_header((2**62, 2**62, 4)) + bytes(16), "declares"),       # beyond int64
    (npy(np.zeros(4, np.float32))[:-3], r"declares float32 \(4,\) \(16 bytes\), but the archive stores 13"),
    (b"not npy data at all", "is not in .npy format"),
    (b"\x93NUMPY\x09\x00", "is not in .npy format"),
    (npy_header((2,), "|O") + bytes(16), "unsupported dtype object"),
    (npy_header((2,), [("a", "<f4")]) + bytes(8), "unsupported dtype"),
    (npy_header((2,), "<M8[s]") + bytes(16), "unsupported dtype"),
])
def test_bad_members_are_one_clear_error_before_allocation(tmp_path, data, match):
    path = archive(tmp_path / "m.npz", {"w.npy": data})
    with traced_peak_below(1 << 20), NpzArchive(path, Bad) as npz, pytest.raises(Bad, match=match):
        npz.read_small("w", 1 << 40)


def test_deflated_member_cannot_claim_more_than_deflate_allows(tmp_path):
    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("w.npy", npy(np.zeros(4, np.float32)))
    raw = bytearray(path.read_bytes())
    # Rewrite the sizes in both headers to claim 1 GiB of data behind a tiny compressed stream.
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("w.npy")
    big = (1 << 30).to_bytes(4, "little")
    raw[info.header_offset + 22: info.header_offset + 26] = big
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 24: cd + 28] = big
    path.write_bytes(bytes(raw))
    with NpzArchive(path, Bad) as npz, pytest.raises(Bad, match="truncated or corrupted"):
        npz.read_small("w", 1 << 31)


def test_corrupted_data_fails_the_crc(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, w=np.arange(100, dtype=np.float64))
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))
    with NpzArchive(path, Bad) as npz, pytest.raises(Bad, match="truncated or corrupted.*CRC"):
        npz.read_small("w", 1 << 20)


def test_read_into_checks_the_target(tmp_path):
    np.savez(tmp_path / "m.npz", w=np.arange(6, dtype=np.float32).reshape(2, 3))
    with NpzArchive(tmp_path / "m.npz", Bad) as npz:
        with pytest.raises(Bad, match=r"holds float32 \(2, 3\), expected float64 \(2, 3\)"):
            npz.read_into("w", np.empty((2, 3)))
        with pytest.raises(Bad, match="member 'v' is missing"):
            npz.header("v")


@pytest.mark.parametrize("content, match", [
    (b"", "not an .npz archive"),
    (b"PK\x03\x04 truncated", "not an .npz archive"),
    (npy(np.zeros(3)), "not an .npz archive"),
])
def test_files_that_are_not_archives(tmp_path, content, match):
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(Bad, match=match):
        NpzArchive(tmp_path / "f", Bad)


def test_paths_that_are_not_regular_files(tmp_path, monkeypatch):
    with pytest.raises(IsADirectoryError):
        open_regular_file(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        open_regular_file(str(tmp_path / "missing"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    exc = raised_in_thread(lambda: open_regular_file(str(fifo)), "open_regular_file")
    assert isinstance(exc, OSError) and "not a regular file" in str(exc)
