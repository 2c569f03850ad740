"""The `convnet` command end to end, through subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_datasets import write_mnist_dir

SCRIPT = Path(sys.executable).parent / "convnet"


def run(*args, script=True, cwd=None, timeout=120):
    cmd = [str(SCRIPT)] if script else [sys.executable, "-m", "convnet"]
    env = {k: v for k, v in os.environ.items() if k != "CONVNET_DEBUG"}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_line_error(proc, code, *fragments):
    assert proc.returncode == code, proc
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" in lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run: 1 epoch on 500 digits."""
    out = tmp_path_factory.mktemp("cli") / "model.npz"
    proc = run("train", "--epochs", 1, "--limit", 500, "--batch-size", 10, "--lr", 0.002, "--out", out,
               script=False)
    return out, proc


def test_console_script_is_installed():
    assert SCRIPT.exists(), f"{SCRIPT} missing: install the package (pip install -e .)"
    proc = run("--help")
    assert proc.returncode == 0 and "train" in proc.stdout and "evaluate" in proc.stdout


def test_train_short_run(trained):
    out, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("training lenet on 500 images from bundled MNIST digits (28x28, 10 classes); 1 epoch,")
    assert "adam lr 0.002 with cosine decay, seed 0, random 1-pixel shifts" in lines[0]
    assert lines[1].startswith("epoch 1/1: loss ")
    assert lines[-2].startswith("test accuracy: ") and "/1000)" in lines[-2]
    accuracy = float(lines[-2].split()[2].rstrip("%"))
    assert 40 < accuracy <= 100  # 500 digits, one epoch: well above chance (10%)
    assert lines[-1] == f"model saved to {out}" and out.exists()


def test_same_seed_same_model(trained, tmp_path):
    import convnet

    out, first = trained
    again = tmp_path / "again.npz"
    proc = run("train", "--epochs", 1, "--limit", 500, "--batch-size", 10, "--lr", 0.002, "--out", again)
    assert proc.returncode == 0, proc.stderr
    def result(stdout):  # "test accuracy: ...% (n/1000), test loss ..." without the timing
        return stdout.splitlines()[-2].split("; trained")[0]

    assert result(proc.stdout) == result(first.stdout)
    a, b = convnet.load(out), convnet.load(again)
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))


def test_evaluate_and_summary_of_the_trained_model(trained):
    out, train = trained
    proc = run("evaluate", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    train_acc = train.stdout.splitlines()[-2].split()[2]
    assert lines[0].startswith(f"{out}: accuracy {train_acc}")  # same model, same test split
    assert lines[3].split() == ["true"] + [str(i) for i in range(10)]
    rows = [line.split() for line in lines[4:]]
    assert len(rows) == 10 and [r[0] for r in rows] == [str(i) for i in range(10)]
    counts = np.array([[int(v) for v in r[1:]] for r in rows])
    assert counts.shape == (10, 10) and (counts.sum(axis=1) == 100).all()
    correct = int(lines[0].split("(")[1].split("/")[0])
    assert np.trace(counts) == correct

    proc = run("summary", out)
    assert proc.returncode == 0, proc.stderr
    assert "Conv2d(1, 16, 5, padding=2)" in proc.stdout and "(N, 10)" in proc.stdout
    assert "Dropout(p=0.25)" in proc.stdout and "Total params: 117,066" in proc.stdout


def test_quiet_train_on_idx_data_then_evaluate_with_data(tmp_path):
    write_mnist_dir(tmp_path / "data", n_train=64, n_test=20)
    out = tmp_path / "idx.npz"
    proc = run("train", "--data", tmp_path / "data", "--epochs", 1, "--optimizer", "sgd", "--lr", "0.01",
               "--seed", 3, "--quiet", "--no-augment", "--out", out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and "/20)" in lines[0] and lines[1] == f"model saved to {out}"
    proc = run("evaluate", out, "--data", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert "/20) on the" in proc.stdout


def test_default_out_path_is_printed(tmp_path):
    proc = run("train", "--epochs", 1, "--limit", 64, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "model saved to out/convnet_mnist.npz"
    assert (tmp_path / "out" / "convnet_mnist.npz").exists()


@pytest.mark.parametrize("args, code, fragments", [
    (["train", "--epochs", "0"], 2, ["--epochs", "positive integer", "'0'"]),
    (["train", "--lr", "fast"], 2, ["--lr", "'fast'"]),
    (["train", "--optimizer", "rmsprop"], 2, ["--optimizer", "rmsprop"]),
    (["train", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
    (["fly"], 2, ["invalid choice: 'fly'"]),
    (["evaluate"], 2, ["MODEL"]),
    (["evaluate", "missing.npz"], 1, ["missing.npz", "does not exist"]),
    (["summary", "missing.npz"], 1, ["does not exist"]),
    (["train", "--data", "no_such_dir", "--epochs", "1"], 1, ["no_such_dir", "does not exist"]),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, code, fragments):
    assert_one_line_error(run(*args, cwd=tmp_path), code, *fragments)


def test_bad_model_files_are_one_line_errors(tmp_path, trained):
    out, _ = trained
    (tmp_path / "trunc.npz").write_bytes(out.read_bytes()[:500])
    assert_one_line_error(run("evaluate", tmp_path / "trunc.npz"), 1, "truncated or corrupted")
    assert_one_line_error(run("summary", tmp_path), 1, "is a directory")
    write_mnist_dir(tmp_path / "small", size=20)
    assert_one_line_error(run("evaluate", out, "--data", tmp_path / "small"), 1,
                          "expects inputs of shape (1, 28, 28)", "(1, 20, 20)")
    (tmp_path / "small" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08 broken")
    assert_one_line_error(run("train", "--data", tmp_path / "small", "--out", tmp_path / "x.npz"), 1,
                          "corrupted or truncated gzip")


def test_no_command_prints_help():
    proc = run(script=False)
    assert proc.returncode == 2 and "train" in proc.stderr


def test_evaluate_needs_only_the_test_files(tmp_path, trained):
    out, _ = trained
    write_mnist_dir(tmp_path / "data", n_test=20)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte"):
        (tmp_path / "data" / name).unlink()
    proc = run("evaluate", out, "--data", tmp_path / "data")
    assert proc.returncode == 0, proc.stderr
    assert "/20) on the" in proc.stdout
    (tmp_path / "data" / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "data" / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 0] + [0, 0, 0, 28] * 2))
    assert_one_line_error(run("evaluate", out, "--data", tmp_path / "data"), 1, "holds no images")


@pytest.mark.parametrize("out, code, fragments", [
    ("", 2, ["--out must be a file path", "got ''"]),
    ("models/", 2, ["--out 'models/' names a directory", "models/convnet_mnist.npz"]),
    (".", 2, ["--out '.' is a directory"]),
    ("afile/m.npz", 1, ["--out 'afile/m.npz'", "directory 'afile'", "a file is in the way"]),
    ("afile/deeper/m.npz", 1, ["--out 'afile/deeper/m.npz'", "a file is in the way"]),
])
def test_out_is_checked_before_training(tmp_path, out, code, fragments):
    (tmp_path / "afile").write_text("not a directory")
    proc = run("train", "--epochs", 1, "--limit", 10, "--out", out, cwd=tmp_path)
    assert_one_line_error(proc, code, *fragments)  # stdout is empty: no training started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_out_in_a_read_only_directory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from convnet import cli

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root ignores the mode: fail the write as a read-only mount would
        real_open = os.open

        def read_only_open(path, *args, **kwargs):
            if os.fspath(path).startswith(str(ro)):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
    code = cli.main(["train", "--epochs", "1", "--limit", "10", "--out", str(ro / "m.npz")])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"convnet train: error: --out '{ro / 'm.npz'}': cannot save the model in "
                                        f"directory '{ro}': Permission denied"]
    ro.chmod(0o755)
    assert list(ro.iterdir()) == []


def test_diverging_training_is_one_error_line_without_numpy_warnings(tmp_path):
    proc = run("train", "--epochs", 1, "--limit", 200, "--lr", "1e30", "--quiet", "--out", tmp_path / "m.npz")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("convnet train: error: training diverged: ") and "lower learning rate" in proc.stderr
    assert "Warning" not in proc.stderr


def test_train_killed_with_sigkill_resumes_to_the_same_model(tmp_path):
    import signal
    import time

    import convnet
    from convnet import cli

    args = ["train", "--epochs", 3, "--limit", 100, "--batch-size", 20, "--quiet"]
    full = run(*args, "--out", tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part.npz"
    env = {k: v for k, v in os.environ.items() if k != "CONVNET_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "convnet", *map(str, args), "--out", str(part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        while not part.exists() and proc.poll() is None:  # the first epoch's checkpoint
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert cli._is_checkpoint(str(part)) and not cli._is_checkpoint(str(tmp_path / "full.npz"))
    resumed = run(*args, "--out", part, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.split("; trained")[0] == full.stdout.split("; trained")[0]  # same test accuracy line
    a, b = convnet.load(tmp_path / "full.npz"), convnet.load(part)
    assert [p.name for p in a.parameters()] == [p.name for p in b.parameters()]
    assert all(np.array_equal(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.npz", "part.npz"]  # no temp file left


def test_resume_messages(tmp_path):
    args = ["train", "--epochs", 1, "--limit", 40, "--batch-size", 20, "--out", tmp_path / "m.npz"]
    fresh = run(*args, "--resume")
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.splitlines()[1] == (f"no checkpoint at {tmp_path / 'm.npz'} to resume from: "
                                            f"starting from scratch")
    assert_one_line_error(run(*args, "--resume"), 1, "holds no training state")  # a finished model
    import convnet

    x, y = convnet.datasets.load_mnist_5k()[:2]

    def interrupt(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted run, in process
        convnet.fit(convnet.lenet(), x[:40], y[:40], epochs=2, progress=False, checkpoint=tmp_path / "c.npz",
                    on_epoch_end=interrupt)
    note = run("train", "--epochs", 1, "--limit", 40, "--out", tmp_path / "c.npz", "--lr", "0.01")
    assert note.stdout.splitlines()[1] == (f"note: {tmp_path / 'c.npz'} holds an interrupted run; training anew "
                                           f"replaces it (--resume continues it)")


def test_memory_error_is_one_line(monkeypatch, capsys):
    from convnet import cli, model

    def exhausted(path):
        raise MemoryError("Unable to allocate 7.28 TiB for an array")

    monkeypatch.setattr(model, "load", exhausted)
    assert cli.main(["summary", "any.npz"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "convnet summary: error: out of memory (Unable to allocate 7.28 TiB for an array)\n"
