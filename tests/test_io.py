"""Atomic saves: orphaned temp files of killed saves, symbolic links, error messages."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import convnet
from convnet import _io

# Writes a temp file for argv[1] through atomic_open, prints its pid, then waits to be killed.
STUCK_SAVE = textwrap.dedent("""
    import os, sys, time
    from convnet._io import atomic_open
    with atomic_open(sys.argv[1]) as fh:
        fh.write(b"half a model")
        fh.flush()
        print(os.getpid(), flush=True)
        time.sleep(600)
""")


def stuck_save(path):
    proc = subprocess.Popen([sys.executable, "-c", STUCK_SAVE, str(path)], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == str(proc.pid)
    return proc


def temps(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_next_save_removes_temp_files_of_killed_saves(tmp_path):
    path = tmp_path / "m.npz"
    convnet.lenet().save(path)
    killed = [stuck_save(path) for _ in range(2)]
    for proc in killed:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    orphans = temps(tmp_path)
    assert len(orphans) == 2 and all(f".m.npz.{p.pid}." in " ".join(orphans) for p in killed)
    other = tmp_path / "other.npz"  # a save to another path leaves them alone
    convnet.lenet().save(other)
    assert temps(tmp_path) == orphans
    alive = stuck_save(path)  # a save still in progress keeps its temp file
    try:
        before = path.read_bytes()
        convnet.lenet(rng=1).save(path)
        assert path.read_bytes() != before
        remaining = temps(tmp_path)
        assert len(remaining) == 1 and f".m.npz.{alive.pid}." in remaining[0]
    finally:
        alive.kill()
        alive.wait()
    convnet.lenet(rng=2).save(path)
    assert temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz", "other.npz"]


def test_unrelated_files_that_look_similar_are_kept(tmp_path):
    path = tmp_path / "m.npz"
    keep = [".m.npz.notapid.0123abcd.tmp", ".m.npz.12.tmp", "m.npz.99999999.0123abcd.tmp",
            ".xm.npz.99999999.0123abcd.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"mine")
    convnet.lenet().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["m.npz"])


def test_saving_through_a_symlink_replaces_its_target(tmp_path):
    """Decision: the link is kept and the file it points to is replaced atomically."""
    (tmp_path / "runs").mkdir()
    target = tmp_path / "runs" / "model-v1.npz"
    convnet.lenet(rng=1).save(target)
    link = tmp_path / "latest.npz"
    link.symlink_to(os.path.relpath(target, tmp_path))
    model = convnet.lenet(rng=2)
    model.save(link)
    assert link.is_symlink() and os.readlink(link) == os.path.join("runs", "model-v1.npz")
    loaded = convnet.load(target)
    assert all(np.array_equal(a.data, b.data) for a, b in zip(model.parameters(), loaded.parameters()))
    assert temps(tmp_path) == [] and temps(tmp_path / "runs") == []
    dangling = tmp_path / "dangling.npz"  # like open(path, "wb"): a dangling link gets its target created
    dangling.symlink_to("runs/new.npz")
    model.save(dangling)
    assert dangling.is_symlink() and (tmp_path / "runs" / "new.npz").is_file()


def test_save_errors_name_the_path_not_the_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(OSError) as info:
        convnet.lenet().save(tmp_path / "taken")
    assert info.value.filename == str(tmp_path / "taken") and ".tmp" not in str(info.value)
    assert temps(tmp_path) == []


def test_check_writable_leaves_nothing_behind(tmp_path):
    _io.check_writable(tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as info:
        _io.check_writable(tmp_path / "no" / "m.npz")
    assert info.value.filename == str(tmp_path / "no" / "m.npz")


def test_the_orphan_check_does_not_mistake_a_dead_pid(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    time.sleep(0.01)
    assert not _io._process_alive(proc.pid) and _io._process_alive(os.getpid())
