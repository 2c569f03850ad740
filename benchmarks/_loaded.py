"""Idle and loaded figures for ``benchmarks/bench.py``: BLAS threads on a busy machine.

On a small machine other processes change the best BLAS thread count: a waiting
OpenBLAS thread spins on its core, and when another process wants that core every
GEMM waits for the scheduler. This section times two workloads

- the default network's training step (``convnet.lenet()``, batch 32, Adam, as ``fit``
  runs it; the torch twin with the same weights), and
- a CIFAR-sized conv layer's forward + backward (the suite's ``cifar`` shape),

under three conditions: as the machine is ("idle"), and with one and two competing
busy processes that the harness starts itself (pure-Python loops that stop on their
own after a deadline, and are killed when the condition ends). Within a condition the
settings (convnet with 1 and 2 BLAS threads and "auto", torch with 1 and 2 threads)
are interleaved round by round and each reports its median, so the ratios compare
figures taken side by side. Each sample first runs the workload for a quarter of a second,
so that it is timed in its own steady state, not in the wake of the previous setting's
threads.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

BUSY_LOOP = ("import time\n"
             "end = time.monotonic() + {seconds}\n"
             "while time.monotonic() < end:\n"
             "    pass\n")
CONDITIONS = (("idle", 0), ("1 busy", 1), ("2 busy", 2))
CONVNET_SETTINGS = (1, 2, "auto")
TORCH_THREADS = (1, 2)


@contextlib.contextmanager
def busy_processes(count: int, seconds: float) -> Iterator[list[subprocess.Popen]]:
    """``count`` processes each keeping one CPU busy for at most ``seconds`` (they stop by
    themselves), terminated when the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=float(seconds))],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(count)]
    try:
        time.sleep(0.2 if count else 0.0)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------- workloads

def lenet_steps(torch: Any, seed: int = 0, batch: int = 32) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """One training step of the default network, convnet and its torch twin (same weights)."""
    import convnet
    from convnet.datasets import load_mnist_5k
    from convnet.losses import CrossEntropyLoss
    from convnet.optim import Adam

    x, y, _, _ = load_mnist_5k()
    xb, yb = x[:batch], y[:batch]
    model = convnet.lenet(rng=seed)
    params = model.parameters()
    opt, loss = Adam(lr=1e-3), CrossEntropyLoss()

    def step() -> None:
        model.zero_grad()
        out = model.forward(xb)
        loss(out, yb)
        model.backward(loss.backward(), input_grad=False)
        opt.step(params)

    if torch is None:
        return step, None
    from _network import torch_twin  # type: ignore[import-not-found]

    tmodel = torch_twin(model, torch)
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-3)
    txb, tyb = torch.from_numpy(xb), torch.from_numpy(yb)

    def tstep() -> None:
        topt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(tmodel(txb), tyb).backward()
        topt.step()

    return step, tstep


def conv_fwd_bwd(torch: Any, shape: Any, seed: int = 0) -> tuple[Callable[[], None], Callable[[], None] | None]:
    """Forward + backward of one conv layer (a ``bench.ConvShape``), convnet and torch."""
    import convnet.functional as F

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.n, shape.c, shape.h, shape.w), dtype=np.float32)
    w = rng.standard_normal((shape.f, shape.c, shape.k, shape.k), dtype=np.float32) * np.float32(0.1)
    b = rng.standard_normal(shape.f, dtype=np.float32)
    oh, ow = shape.out_hw
    dy = rng.standard_normal((shape.n, shape.f, oh, ow), dtype=np.float32)
    kw = dict(stride=shape.s, padding=shape.p)

    def run() -> None:
        y, cache = F.conv2d_with_cache(x, w, b, **kw)
        F.conv2d_backward(dy, x, w, cache=cache, **kw)

    if torch is None:
        return run, None
    tx = torch.from_numpy(x).requires_grad_(True)
    tw, tb = torch.from_numpy(w).requires_grad_(True), torch.from_numpy(b).requires_grad_(True)
    tdy = torch.from_numpy(dy)

    def trun() -> None:
        y = torch.nn.functional.conv2d(tx, tw, tb, **kw)
        torch.autograd.grad(y, (tx, tw, tb), tdy)

    return run, trun


# --------------------------------------------------------------------------- measuring

# Warm-up before each sample: at least one call and this long. The previous sample's idle
# threads keep spinning for a while after it (OpenBLAS's for about 0.1 s), taking a core from
# whatever runs next: with one call of warm-up, "auto" (timed right after the 2-thread
# sample) measured 2x its steady-state step time with one busy process.
SETTLE_SECONDS = 0.25


def _time_calls(fn: Callable[[], None], calls: int, step: Callable[[], None] | None = None) -> float:
    """Median seconds per call of ``calls`` timed calls, after warm-up calls for at least
    :data:`SETTLE_SECONDS`."""
    start = time.perf_counter()
    while True:
        if step is not None:
            step()
        fn()
        if time.perf_counter() - start >= SETTLE_SECONDS:
            break
    times = []
    for _ in range(calls):
        if step is not None:
            step()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _convnet_sample(fn: Callable[[], None], setting: int | str, calls: int) -> float:
    from convnet import _blas

    with _blas.blas_threads(setting) as threads:
        return _time_calls(fn, calls, threads.step)


def _torch_sample(torch: Any, fn: Callable[[], None], threads: int, calls: int) -> float:
    from convnet import _blas

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _blas.limit_blas_threads(1):  # numpy's pool sleeps meanwhile
            return _time_calls(fn, calls)
    finally:
        torch.set_num_threads(old)


def measure_condition(workloads: dict[str, tuple[Callable, Callable | None]], torch: Any, rounds: int,
                      calls: int) -> dict[str, dict[str, float]]:
    """Median seconds per call of every workload and setting, interleaved round by round."""
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in workloads}
    for _ in range(rounds):
        for name, (fn, tfn) in workloads.items():
            for setting in CONVNET_SETTINGS:
                samples[name].setdefault(f"convnet {setting}", []).append(_convnet_sample(fn, setting, calls))
            if tfn is not None:
                for threads in TORCH_THREADS:
                    samples[name].setdefault(f"torch {threads}", []).append(
                        _torch_sample(torch, tfn, threads, calls))
    return {name: {k: statistics.median(v) for k, v in d.items()} for name, d in samples.items()}


def run_loaded(torch: Any, conv_shape: Any, rounds: int = 5, calls: int = 5,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Idle and loaded figures of every workload and thread setting (see the module docstring)."""
    from convnet import _blas

    workloads = {"lenet train step (batch 32)": lenet_steps(torch),
                 f"{conv_shape.name} conv fwd+bwd": conv_fwd_bwd(torch, conv_shape)}
    # A generous bound for the competing processes: they stop by themselves even if we die.
    probe = {name: _convnet_sample(fn, 1, 1) for name, (fn, _) in workloads.items()}
    per_round = ((sum(probe.values()) * (calls + 1) + SETTLE_SECONDS * len(workloads))
                 * (len(CONVNET_SETTINGS) + len(TORCH_THREADS)))
    bound = 60.0 + 20 * rounds * per_round
    result: dict[str, Any] = {"rounds": rounds, "calls": calls, "cpus": _blas.usable_cpus(),
                              "busy_bound_s": bound, "conditions": {}}
    for label, count in CONDITIONS:
        log(f"  {label}: {rounds} interleaved rounds ...")
        with busy_processes(count, bound):
            t0 = time.perf_counter()
            figures = measure_condition(workloads, torch, rounds, calls)
            result["conditions"][label] = {"busy_processes": count, "figures": figures,
                                           "seconds": time.perf_counter() - t0,
                                           "policy_last_others": _blas.policy().others}
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per workload and condition: the best fixed setting, auto over it, and torch over convnet."""
    rows = []
    for label, cond in result["conditions"].items():
        for name, fig in cond["figures"].items():
            fixed = {k: v for k, v in fig.items() if k.startswith("convnet ") and k != "convnet auto"}
            best = min(fixed, key=fixed.get)
            torch_best = min((v for k, v in fig.items() if k.startswith("torch")), default=None)
            rows.append({"workload": name, "condition": label, "best_fixed": best,
                         "auto_over_best_fixed": fig["convnet auto"] / fig[best],
                         "throughput_vs_torch_auto": (torch_best / fig["convnet auto"]) if torch_best else None,
                         "throughput_vs_torch_best": (torch_best / fig[best]) if torch_best else None})
    return rows


def render_loaded(result: dict[str, Any]) -> list[str]:
    """Text table: one row per workload and condition, time per call of every setting."""
    out = [f"Idle and loaded (harness-started busy processes; {result['rounds']} interleaved rounds, "
           f"median of {result['calls']} calls each; {result['cpus']} CPUs; 'idle' is the machine as it was)"]
    settings = [f"convnet {s}" for s in CONVNET_SETTINGS] + [f"torch {t}" for t in TORCH_THREADS]
    head = ["workload", "condition"] + [s.replace("convnet ", "cn ").replace(" auto", " auto") for s in settings] \
        + ["auto/best", "vs torch"]
    rows = []
    summary = {(r["workload"], r["condition"]): r for r in result["summary"]}
    for label, cond in result["conditions"].items():
        for name, fig in cond["figures"].items():
            s = summary[(name, label)]
            vs = s["throughput_vs_torch_auto"]
            rows.append([name, label] + [f"{fig[k] * 1e3:.1f} ms" if k in fig else "-" for k in settings]
                        + [f"{s['auto_over_best_fixed']:.2f}x", "-" if vs is None else f"{vs:.2f}x"])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out += [fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    out.append("auto/best: convnet's default ('auto') time over its best fixed thread count in that condition; "
               "vs torch: convnet 'auto' throughput / torch's best")
    return out


if __name__ == "__main__":  # a quick look: python benchmarks/_loaded.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench  # type: ignore[import-not-found]

    torch_mod, _ = bench.load_torch(2)
    res = run_loaded(torch_mod, bench.SUITE["cifar"], rounds=int(os.environ.get("ROUNDS", "3")))
    print("\n".join(render_loaded(res)))
