"""The accumulating GEMM against numpy's matmul, on views, transposes and both dtypes."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convnet import _blas


@st.composite
def gemm_case(draw):
    m, k, n = (draw(st.integers(1, 9)) for _ in range(3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def view(rows, cols):
        """A (rows, cols) operand: contiguous, a strided window, or a transposed view."""
        kind = draw(st.sampled_from(["plain", "window", "transposed"]))
        if kind == "plain":
            return rng.standard_normal((rows, cols)).astype(dtype)
        if kind == "window":
            return rng.standard_normal((rows + 2, cols + 3)).astype(dtype)[1:rows + 1, 2:cols + 2]
        return rng.standard_normal((cols, rows)).astype(dtype).T

    a, b = view(m, k), view(k, n)
    big = rng.standard_normal((m + 3, n + 2)).astype(dtype)
    c = big[1:m + 1, 1:n + 1] if draw(st.booleans()) else big[:m, :n].copy()
    beta = draw(st.sampled_from([0.0, 1.0]))
    return a, b, c, big, beta


def check(case):
    a, b, c, big, beta = case
    before_big = big.copy()
    expected = a @ b + (beta * c if beta else 0)
    is_view = np.shares_memory(c, big)
    _blas.gemm(a, b, c, beta=beta)
    np.testing.assert_allclose(c, expected, rtol=1e-5, atol=1e-5)
    assert c.dtype == a.dtype
    if is_view:  # nothing outside the view was touched
        mask = np.ones(big.shape, bool)
        mask[1:1 + c.shape[0], 1:1 + c.shape[1]] = False
        np.testing.assert_array_equal(big[mask], before_big[mask])


@settings(max_examples=100, deadline=None)
@given(gemm_case())
def test_gemm_matches_matmul(case):
    check(case)


@settings(max_examples=30, deadline=None)
@given(gemm_case())
def test_fallback_without_cblas_matches_matmul(case):
    saved = dict(_blas._GEMM)
    _blas._GEMM.clear()
    try:
        check(case)
    finally:
        _blas._GEMM.update(saved)


def test_beta_zero_ignores_garbage():
    a = np.ones((3, 2), np.float32)
    b = np.ones((2, 4), np.float32)
    c = np.full((3, 4), np.nan, np.float32)
    _blas.gemm(a, b, c, beta=0.0)
    np.testing.assert_array_equal(c, 2.0)


def test_numpy_cblas_is_found_on_this_build():
    """numpy's wheels bundle OpenBLAS; finding it avoids a second BLAS thread pool."""
    info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if "openblas" not in info.get("name", ""):
        pytest.skip(f"numpy is built against {info.get('name')}, not a bundled OpenBLAS")
    if os.environ.get(_blas.FALLBACK_ENV) == "1":  # the suite's forced-fallback run
        assert not _blas.available() and "forced" in _blas.backend().detail
    else:
        assert _blas.available(), str(_blas.backend())


# --------------------------------------------------------------------------- guards

def _operands(dtype_a=np.float32, dtype_b=np.float32, dtype_c=np.float32, m=3, k=4, n=5, c_rows=None):
    a = np.ones((m, k), dtype_a)
    b = np.ones((k, n), dtype_b)
    big = np.full((m + 2, n + 2), 7, dtype_c)
    c = big[:c_rows if c_rows is not None else m, :n]
    return a, b, c, big


@pytest.mark.parametrize("dtypes", [(np.float64, np.float64, np.float32), (np.float32, np.float64, np.float32),
                                    (np.float32, np.float32, np.float64), (np.int64, np.int64, np.int64)])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_mismatched_dtypes_raise_before_writing(dtypes, beta):
    a, b, c, big = _operands(*dtypes)
    before = big.copy()
    with pytest.raises(TypeError, match="one float dtype"):
        _blas.gemm(a, b, c, beta=beta)
    np.testing.assert_array_equal(big, before)


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("shapes", [dict(c_rows=2), dict(c_rows=4)])
def test_short_or_long_c_raises_before_writing(beta, shapes):
    a, b, c, big = _operands(**shapes)
    before = big.copy()
    with pytest.raises(ValueError, match="shapes do not match"):
        _blas.gemm(a, b, c, beta=beta)
    np.testing.assert_array_equal(big, before)


def test_inner_dimensions_must_chain():
    with pytest.raises(ValueError, match=r"a \(3, 4\) @ b \(5, 2\) into c \(3, 2\)"):
        _blas.gemm(np.ones((3, 4)), np.ones((5, 2)), np.zeros((3, 2)))


def test_non_matrix_and_read_only_operands_raise():
    a, b, c, _ = _operands()
    with pytest.raises(TypeError, match="a must be a 2-D ndarray"):
        _blas.gemm(a.ravel(), b, c)
    with pytest.raises(TypeError, match="b must be a 2-D ndarray"):
        _blas.gemm(a, b.tolist(), c)
    c.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        _blas.gemm(a, b, c)


def test_empty_inner_dimension():
    c = np.full((2, 3), 5.0)
    _blas.gemm(np.ones((2, 0)), np.ones((0, 3)), c, beta=1.0)
    np.testing.assert_array_equal(c, 5.0)
    _blas.gemm(np.ones((2, 0)), np.ones((0, 3)), c, beta=0.0)
    np.testing.assert_array_equal(c, 0.0)


# --------------------------------------------------------------------------- finding numpy's BLAS

def test_backend_names_numpy_blas_from_threadpoolctl():
    import threadpoolctl

    b = _blas.backend()
    if not _blas.available():
        assert b.path == "matmul" and b.detail
        return
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
    ours = [p for p in threadpoolctl.threadpool_info() if p["filepath"] == b.library]
    assert b.path == "cblas" and len(ours) == 1 and ours[0]["user_api"] == "blas"
    assert os.path.realpath(b.library).startswith(os.path.realpath(numpy_dir))
    assert b.library in str(b) and "gemm" in b.detail


def _pool(path, api="openblas"):
    return {"user_api": "blas", "internal_api": api, "filepath": path, "version": "1", "num_threads": 2}


def test_numpy_pool_picks_the_library_inside_numpy():
    site = os.path.dirname(os.path.dirname(os.path.realpath(np.__file__)))
    mine = _pool(os.path.join(site, "numpy.libs", "libopenblas.so"))
    other = _pool(os.path.join(site, "scipy.libs", "libopenblas.so"))
    omp = {"user_api": "openmp", "internal_api": "openmp", "filepath": "/x/libgomp.so"}
    assert _blas._numpy_pool([other, omp, mine]) == (mine, "")
    mac = _pool(os.path.join(site, "numpy", ".dylibs", "libscipy_openblas64_.dylib"))
    assert _blas._numpy_pool([other, mac]) == (mac, "")


def test_numpy_pool_takes_a_single_system_blas_and_reports_ambiguity():
    single = _pool("/usr/lib/x86_64-linux-gnu/libmkl_rt.so", "mkl")
    assert _blas._numpy_pool([single]) == (single, "")
    pool, why = _blas._numpy_pool([single, _pool("/opt/libopenblas.so")])
    assert pool is None and "several BLAS libraries" in why and "/opt/libopenblas.so" in why
    pool, why = _blas._numpy_pool([])
    assert pool is None and "no BLAS" in why


def test_self_test_rejects_a_wrong_gemm():
    def broken(*args):
        return None  # writes nothing

    assert "self-test" in _blas._self_test({np.dtype(np.float32): broken})
    if _blas.available():
        assert _blas._self_test(_blas._GEMM) == ""


def test_environment_switch_forces_the_fallback():
    code = ("from convnet import _blas; b = _blas.backend(); "
            "print(b.path, _blas.available(), b.detail)")
    env = {**os.environ, _blas.FALLBACK_ENV: "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == ["matmul", "False"] and _blas.FALLBACK_ENV in out.stdout


# --------------------------------------------------------------------------- threads

def test_limit_blas_threads_sets_and_restores():
    before = _blas.get_num_threads()
    if before is None:
        pytest.skip("numpy's BLAS thread pool is not controllable here")
    with _blas.limit_blas_threads(1):
        assert _blas.get_num_threads() == 1
    assert _blas.get_num_threads() == before
    with _blas.limit_blas_threads(None):
        assert _blas.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive int"):
        with _blas.limit_blas_threads(0):
            pass


@pytest.mark.parametrize("others, cpus, most, want", [
    (0.0, 2, 2, 2), (0.4, 2, 2, 2), (0.6, 2, 2, 1), (1.0, 2, 2, 1), (2.5, 2, 2, 1),
    (0.0, 2, 1, 1), (0.0, 8, 8, 8), (3.2, 8, 8, 5), (0.0, 8, 4, 4), (-0.5, 2, 2, 2),
])
def test_choose_threads(others, cpus, most, want):
    assert _blas.choose_threads(others, cpus, most) == want


class FakeMachine:
    """A clock, machine-wide busy CPU seconds and this process's own CPU seconds, all made up."""

    def __init__(self):
        self.now, self.busy_s, self.own_s, self.applied = 0.0, 0.0, 0.0, []
        self.readable = True
        self.runnable = None  # the others' runnable threads at the next reading (None: unknown)

    def run(self, seconds, ours, others):
        """``seconds`` of wall time with this process on ``ours`` CPUs and others on ``others``."""
        self.now += seconds
        self.own_s += ours * seconds
        self.busy_s += (ours + others) * seconds

    def policy(self, **kw):
        return _blas.ThreadPolicy(most=2, cpus=2, interval=0.25, busy=lambda: self.busy_s if self.readable else None,
                                  own=lambda: self.own_s, demand=lambda: self.runnable, clock=lambda: self.now,
                                  apply=self.applied.append, **kw)


def test_policy_drops_to_one_thread_when_others_are_busy_and_comes_back():
    m = FakeMachine()
    p = m.policy()
    assert p.start() == 1 and m.applied == [1]  # nothing measured yet: the safe side
    m.run(0.1, ours=1, others=0.0)
    assert p.update() == 1 and p.others is None  # within the first interval
    m.run(0.2, ours=1, others=0.0)
    assert p.update() == 2 and p.others == 0.0
    m.run(0.3, ours=1.3, others=0.7)  # another process took a core
    assert p.update() == 1 and p.others == pytest.approx(0.7)
    m.run(0.3, ours=1.0, others=1.0)
    assert p.update() == 1
    m.run(0.3, ours=1.0, others=0.1)  # it stopped
    assert p.update() == 2
    assert m.applied == [1, 2, 1, 2]  # applied only when the choice changes
    m.run(0.3, ours=1.0, others=2.0)
    assert p.start(most=1) == 1  # a new block with a lower cap; readings carry over
    m.run(0.3, ours=1.0, others=0.0)
    assert p.update() == 1 and p.start(most=2) == 2


def test_policy_counts_runnable_others_that_get_no_cpu():
    """Our two spinning threads hold both cores: the others got no CPU time but want it."""
    m = FakeMachine()
    p = m.policy()
    p.start()
    m.runnable = 2.0
    m.run(0.3, ours=2.0, others=0.0)
    assert p.update() == 1 and p.others == 2.0
    m.runnable = 0.0  # they stopped: CPU time and the count agree again
    m.run(0.3, ours=1.0, others=0.0)
    assert p.update() == 2 and p.others == 0.0


def test_policy_ignores_a_passing_runnable_process():
    m = FakeMachine()
    p = m.policy()
    p.start()
    m.runnable = 0.0
    m.run(0.3, ours=1.0, others=0.0)
    assert p.update() == 2
    m.runnable = 2.0  # one reading only: the smaller of the last two counts
    m.run(0.3, ours=1.0, others=0.0)
    assert p.update() == 2
    m.run(0.3, ours=1.0, others=0.0)  # still runnable at the next reading: it counts
    assert p.update() == 1


def test_others_runnable_reads_this_machine():
    seen = _blas._others_runnable()
    assert seen is None or (seen >= 0 and seen == int(seen))


def test_policy_reads_at_most_once_per_interval():
    m = FakeMachine()
    p = m.policy()
    p.start()
    m.run(0.3, ours=1.0, others=0.0)
    assert p.update() == 2
    reads = []
    p._busy = lambda: reads.append(m.now) or m.busy_s
    for _ in range(20):  # many small calls within one interval: no reading
        m.run(0.01, ours=1.0, others=2.0)
        assert p.update() == 2
    assert reads == []
    m.run(0.1, ours=1.0, others=2.0)
    assert p.update() == 1 and len(reads) == 1


def test_policy_keeps_the_most_threads_without_proc_stat():
    m = FakeMachine()
    m.readable = False
    p = m.policy()
    p.start()
    m.run(1.0, ours=1.0, others=2.0)
    assert p.update() == 2 and p.others is None


def test_resolve_threads(monkeypatch):
    monkeypatch.delenv(_blas.THREADS_ENV, raising=False)
    assert _blas.resolve_threads(None) == "auto"
    assert _blas.resolve_threads(3) == 3 and _blas.resolve_threads("auto") == "auto"
    monkeypatch.setenv(_blas.THREADS_ENV, "1")
    assert _blas.resolve_threads(None) == 1
    assert _blas.resolve_threads(2) == 2  # an argument wins over the environment
    monkeypatch.setenv(_blas.THREADS_ENV, "many")
    with pytest.raises(ValueError, match=_blas.THREADS_ENV):
        _blas.resolve_threads(None)
    for bad in (0, -1, True, 1.5, "fast"):
        with pytest.raises(ValueError, match="blas_threads"):
            _blas.resolve_threads(bad)


def test_blas_threads_block_restores_the_pool(monkeypatch):
    before = _blas.get_num_threads()
    if before is None:
        pytest.skip("numpy's BLAS thread pool is not controllable here")
    with _blas.blas_threads(1) as t:
        t.step()
        assert _blas.get_num_threads() == 1
    assert _blas.get_num_threads() == before
    with _blas.blas_threads("auto") as t:
        assert t.policy is _blas.policy() and t.policy.most == before
        assert _blas.get_num_threads() == t.policy.threads
        with _blas.blas_threads("auto") as inner:  # nested: the same policy goes on
            assert inner is t
        t.policy._mark = (t.policy._mark[0] - 1.0,) + t.policy._mark[1:]  # an interval has passed
        t.step()
        assert _blas.get_num_threads() == t.policy.threads
    assert _blas.get_num_threads() == before
