"""Smoke tests of the benchmark harness (benchmarks/bench.py) on tiny shapes.

They run the harness in-process in its quick mode with tiny budgets, so the whole
file takes a few seconds; torch is used when importable and skipped otherwise,
as the harness itself does.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402
import convnet.functional as F  # noqa: E402

TINY = ["--quick", "--budget", "0.01", "--gemm-n", "64",
        "--conv", "tiny=2,3,9,9,4,3,2,1", "--pool", "tinypool=max,2,3,8,8,2,2"]


def _run(tmp_path, extra=()):
    path = tmp_path / "out.json"
    code = bench.main(TINY + ["--json", str(path), *extra])
    return code, json.loads(path.read_text())


def test_quick_run_writes_a_complete_report(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, report = _run(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.json").st_mode & 0o777 == 0o644  # the user's umask, not mkstemp's 0600
    out = capsys.readouterr().out
    assert code == 0
    assert report["ok"] is True
    assert report["gemm"]["gflops"] > 0 and report["gemm"]["n"] == 64
    assert report["threads"]["cpu_count"] == os.cpu_count()
    assert [c["name"] for c in report["cases"]] == ["tiny", "tinypool"]
    for case in report["cases"]:
        assert case["status"] == "ok"
        vec = case["impls"]["vectorized"]
        for phase in ("forward", "forward_backward"):
            assert vec[phase]["median_s"] > 0 and vec[phase]["repeats"] >= 2
        ref = case["impls"]["reference"]
        assert ref["scaled_to_batch"] == 2
        assert ref["forward"]["images"] == ref["forward_backward"]["images"] == 1
        # scaled per image: the batch figure is twice the measured one-image figure
        assert math.isclose(ref["forward"]["median_s"], 2 * ref["forward"]["measured_median_s"])
        whats = " ".join(k["what"] for k in case["checks"])
        assert "vectorized vs reference" in whats
        assert all(k["pass"] for k in case["checks"])
        torch_used = not report["torch"].startswith("not used")
        assert ("vectorized vs torch" in whats) == torch_used
        assert case["ratios"]["forward_backward"]["reference_over_vectorized"] > 0
        assert case["memory"]["forward_peak_bytes"] > 0
    conv = report["cases"][0]
    # N=2, OH=OW=5, C=3, K=3, float32
    assert conv["im2col_bytes"] == 2 * 5 * 5 * 3 * 3 * 3 * 4
    assert conv["flops"]["forward"] == 2 * 2 * 4 * 5 * 5 * 3 * 3 * 3
    assert conv["rates"]["vectorized"]["forward"]["gflops"] > 0
    assert any("peak extra memory" in t["target"] for t in report["targets"])
    assert "Targets:" in out and "tiny" in out and "scaled to the batch size" in out
    assert "RESULT: all results correct" in out
    from convnet import _blas
    assert report["gemm_path"] == str(_blas.backend()) and f"convnet GEMM: {_blas.backend()}" in out
    assert os.listdir(tmp_path) == ["out.json"]  # the atomic write left no temporary file


def test_a_wrong_gradient_is_refused(tmp_path, monkeypatch, capsys):
    real = F.conv2d_backward

    def off_by_a_little(*args, **kwargs):
        dx, dw, db = real(*args, **kwargs)
        dx = dx.copy()
        dx.flat[0] += 0.05 * float(np.abs(dx).max()) + 1.0
        return dx, dw, db

    monkeypatch.setattr(F, "conv2d_backward", off_by_a_little)
    code, report = _run(tmp_path, ["--no-torch"])
    out = capsys.readouterr().out
    assert code == 1
    assert report["ok"] is False
    tiny, pool = report["cases"]
    assert tiny["status"] == "FAILED"
    assert any(not k["pass"] and k["what"].endswith(": dx") for k in tiny["checks"])
    # no figure of a wrong result is reported
    assert tiny["impls"]["vectorized"] == {"status": "FAILED", "reason": "result check failed"}
    assert "ratios" not in tiny and "memory" not in tiny
    assert not any(t["target"].startswith("tiny") for t in report["targets"])
    assert pool["status"] == "ok"  # the other shape still reports
    assert "FAILED" in out and "WRONG RESULTS" in out


def test_compare_tolerance():
    rng = np.random.default_rng(0)
    want = rng.standard_normal((4, 5)).astype(np.float32)
    assert bench.compare("same", want + np.float32(1e-7), want)["pass"]
    bad = want.copy()
    bad[1, 2] += 0.01
    assert not bench.compare("off", bad, want)["pass"]
    assert not bench.compare("shape", want[:3], want)["pass"]
    assert not bench.compare("nan", np.full_like(want, np.nan), want)["pass"]


def _fake_case(name, kind, torch_ratio, ref_ratio=None, mem=None):
    return {"name": name, "kind": kind, "status": "ok",
            "ratios": {"forward": {"vectorized_over_torch": 1.0, "reference_over_vectorized": ref_ratio},
                       "forward_backward": {"vectorized_over_torch": torch_ratio,
                                            "reference_over_vectorized": ref_ratio}},
            **({"memory": {"forward_ratio": mem}} if mem is not None else {})}


def test_targets_geometric_mean_and_limits():
    cases = [_fake_case("a", "conv", 0.5, ref_ratio=2000.0, mem=1.2),
             _fake_case("b", "conv", 1.6, ref_ratio=900.0, mem=1.6),
             _fake_case("p", "pool", 0.9), _fake_case("q", "pool", 1.1)]
    depthwise = dict(_fake_case("d", "conv", 1.9), params={"groups": 8})
    rows = {t["target"]: t for t in bench.evaluate_targets(cases + [depthwise])}
    gm = rows["conv fwd+bwd time vs torch, geometric mean"]
    assert math.isclose(gm["value"], math.sqrt(0.5 * 1.6)) and gm["pass"] is True  # dense layers only
    assert rows["d fwd+bwd time vs torch"]["limit"] == bench.TARGET_GROUPED_TORCH
    assert rows["d fwd+bwd time vs torch"]["pass"] is True
    assert rows["b fwd+bwd time vs torch"]["pass"] is False
    assert rows["a fwd+bwd time vs torch"]["pass"] is True
    assert rows["a fwd+bwd: vectorized speedup over loop reference"]["pass"] is True
    assert rows["b fwd: vectorized speedup over loop reference"]["pass"] is False
    assert rows["p fwd+bwd time vs torch"]["pass"] is True
    assert rows["q fwd+bwd time vs torch"]["pass"] is False  # pooling's goal is torch's time or less
    assert rows["b forward peak extra memory / one im2col buffer"]["pass"] is False
    assert rows["a forward peak extra memory / one im2col buffer"]["pass"] is True


def test_bad_shape_options_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--conv", "tiny=2,3,9"])
    with pytest.raises(SystemExit):
        bench.main(["--pool", "p=median,2,3,8,8,2,2"])
    with pytest.raises(SystemExit):
        bench.main(["--shape", "no-such-shape"])


def test_network_twin_agrees_and_a_wrong_twin_is_refused():
    torch = pytest.importorskip("torch")
    import _network
    import convnet
    from convnet.datasets import load_mnist_5k

    x, y = load_mnist_5k()[:2]
    x, y = x[:8], y[:8]
    model = convnet.lenet(rng=0)
    twin = _network.torch_twin(model, torch)
    assert _network.check_one_batch(model, twin, x, y, torch)["pass"]
    with torch.no_grad():
        twin[0].weight[0, 0, 2, 2] += 0.5
    check = _network.check_one_batch(model, twin, x, y, torch)
    assert not check["pass"] and check["worst_rel_err"] > _network.TOLERANCE


def test_a_too_slow_reference_is_skipped_not_failed_and_threads_are_set(tmp_path):
    code, report = _run(tmp_path, ["--no-torch", "--ref-limit", "0.000001", "--threads", "1"])
    assert code == 0 and report["ok"] is True
    try:
        import threadpoolctl  # noqa: F401
    except ImportError:
        assert "NOT set" in report["threads"]["note"]
    else:
        assert report["threads"]["numpy_blas"] == 1
    for case in report["cases"]:
        ref = case["impls"]["reference"]
        for phase in ("forward", "forward_backward"):
            assert ref[phase]["status"] == "skipped"
        assert "too slow" in ref["forward"]["reason"]
        assert case["ratios"]["forward"]["reference_over_vectorized"] is None
    assert not any("loop reference" in t["target"] for t in report["targets"])


def test_busy_processes_are_started_and_stopped():
    import _loaded

    with _loaded.busy_processes(2, seconds=30) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)  # spinning
    assert all(p.poll() is not None for p in procs)  # gone when the block ends
    with _loaded.busy_processes(1, seconds=0.05) as procs:  # and they stop by themselves
        procs[0].wait(timeout=20)
        assert procs[0].returncode == 0


def test_loaded_mode_reports_every_condition_and_setting(tmp_path, monkeypatch, capsys):
    import _loaded

    calls = []

    def fake(name, torch):
        def fn():
            calls.append(name)
        return fn, (fn if torch is not None else None)  # as the real ones: no torch half without torch

    monkeypatch.setattr(_loaded, "lenet_steps", lambda torch: fake("lenet", torch))
    monkeypatch.setattr(_loaded, "conv_fwd_bwd", lambda torch, shape: fake("conv", torch))
    monkeypatch.setattr(_loaded, "SETTLE_SECONDS", 0.0)  # one warm-up call a sample
    code, report = _run(tmp_path, ["--loaded", "--loaded-rounds", "1"])
    out = capsys.readouterr().out
    assert code == 0
    loaded = report["loaded"]
    assert list(loaded["conditions"]) == ["idle", "1 busy", "2 busy"]
    assert [c["busy_processes"] for c in loaded["conditions"].values()] == [0, 1, 2]
    torch_used = not report["torch"].startswith("not used")
    for cond in loaded["conditions"].values():
        for fig in cond["figures"].values():
            want = {"convnet 1", "convnet 2", "convnet auto"} | ({"torch 1", "torch 2"} if torch_used else set())
            assert set(fig) == want and all(v > 0 for v in fig.values())
    assert len(loaded["summary"]) == 6
    for row in loaded["summary"]:
        assert row["best_fixed"] in ("convnet 1", "convnet 2") and row["auto_over_best_fixed"] > 0
    assert "Idle and loaded" in out and "2 busy" in out and "auto/best" in out
    targets = {t["target"]: t for t in report["targets"]}
    assert targets["lenet train step (batch 32), 1 busy: default threads time / best fixed threads"]["limit"] == 1.5
    if torch_used:
        idle = targets["lenet train step (batch 32), idle: throughput vs torch (default threads vs torch's best)"]
        assert idle["limit"] == 0.7 and idle["value"] > 0
    assert {"lenet", "conv"} <= set(calls)


def test_loaded_samples_warm_up_for_the_settle_time(monkeypatch):
    """Each sample runs its workload for SETTLE_SECONDS before timing (the previous
    setting's spinning threads die down meanwhile), then times ``calls`` calls."""
    import _loaded

    clock = {"now": 0.0}
    monkeypatch.setattr(_loaded.time, "perf_counter", lambda: clock["now"])
    calls = []

    def fn():
        calls.append(clock["now"])
        clock["now"] += 0.1

    assert _loaded._time_calls(fn, 3) == pytest.approx(0.1)
    assert len(calls) == 3 + 3  # warm-up calls at 0, 0.1 and 0.2: the third ends at 0.3 >= 0.25
    monkeypatch.setattr(_loaded, "SETTLE_SECONDS", 0.0)
    calls.clear()
    _loaded._time_calls(fn, 2)
    assert len(calls) == 1 + 2


def test_winograd_rows_are_checked_and_timed_in_alternation(tmp_path, capsys):
    """A stride-1 3x3 layer gets Winograd rows (where numba imports): checked against the
    exact engine (and torch), timed in alternation with torch, with its own target."""
    from convnet import _winograd

    path = tmp_path / "out.json"
    code = bench.main(["--quick", "--budget", "0.01", "--gemm-n", "64", "--no-reference",
                       "--conv", "wino=2,3,8,8,4,3,1,1", "--json", str(path)])
    report = json.loads(path.read_text())
    out = capsys.readouterr().out
    assert code == 0
    wino = report["cases"][0]["impls"]["winograd"]
    if not _winograd.available():
        assert wino["status"] == "skipped" and "numba" in wino["reason"]
        return
    whats = " ".join(k["what"] for k in report["cases"][0]["checks"])
    assert "winograd vs vectorized (exact): dw" in whats
    assert wino["forward_backward"]["median_s"] > 0 and wino["forward"]["repeats"] >= 2
    torch_used = not report["torch"].startswith("not used")
    assert ("paired_torch" in wino["forward"]) == torch_used
    assert "Winograd F(4x4, 3x3)" in out
    target = [t for t in report["targets"] if "Winograd" in t["target"]]
    assert len(target) == (1 if torch_used else 0)


def test_strided_layers_have_no_winograd_rows(tmp_path):
    _, report = _run(tmp_path, ["--no-torch"])
    assert report["cases"][0]["impls"]["winograd"]["status"] == "skipped"
