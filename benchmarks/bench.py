#!/usr/bin/env python
"""Benchmark harness: loop reference vs vectorized engine vs PyTorch CPU.

Times a fixed suite of float32 convolution and pooling layers, forward and
forward + backward, for

- the loop reference ``convnet.reference`` (timed on a few images and scaled
  per image, because it is slow),
- the vectorized engine ``convnet.functional`` (``conv2d`` for the forward;
  ``conv2d_with_cache`` + ``conv2d_backward(cache=...)`` for forward + backward,
  as the layers use it; max pooling's forward is ``max_pool2d`` and its forward +
  backward ``max_pool2d_with_argmax`` + ``max_pool2d_backward(argmax=...)``, as the
  ``MaxPool2d`` layer runs it, keeping the arg-max like torch's autograd keeps its
  indices; mean pooling is ``avg_pool2d`` + ``avg_pool2d_backward``),
- PyTorch's CPU ``conv2d`` / ``max_pool2d`` / ``avg_pool2d`` with autograd,
  when ``torch`` is importable,

all in one process with the same thread count. Every result is checked
(vectorized against the loop reference on the images it ran, and against
torch); a wrong one is marked FAILED, is not reported, and makes the exit
status non-zero. Missed speed targets are reported but do not fail the run.

Usage::

    python benchmarks/bench.py                   # the whole suite (a few minutes)
    python benchmarks/bench.py --quick           # fewer repeats, no whole-network run
    python benchmarks/bench.py --shape lenet-c1  # one shape (repeatable)
    python benchmarks/bench.py --conv tiny=2,3,8,8,4,3,1,1 --no-torch
    python benchmarks/bench.py --resnet --threads 1  # only the ResNet and batch-norm rows

The JSON report goes to ``benchmarks/results/latest.json`` (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

import _timing  # sibling module: this script's folder is on sys.path when it runs
from convnet._io import atomic_open

DTYPE = np.dtype(np.float32)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_JSON = os.path.join(RESULTS_DIR, "latest.json")

# Targets: speed against the loop reference and PyTorch, memory of the forward pass.
TARGET_REF_SPEEDUP = 1000.0
TARGET_TORCH_GEOMEAN = 1.0
TARGET_TORCH_MAX = 1.5
TARGET_POOL_TORCH = 1.0
TARGET_FWD_MEMORY = 1.5
# The compiled Winograd path (convnet[fast]) on the stride-1 3x3 layers, forward + backward.
TARGET_WINOGRAD_TORCH = 0.8
# A grouped (depthwise) layer's forward + backward, vs torch's time.
TARGET_GROUPED_TORCH = 2.0
# Warn when other processes used more than this share of the CPUs during a case.
BUSY_WARN = 0.10

# float32 results are compared by their largest error relative to the largest
# magnitude of the witness: summation order differs (BLAS blocking, loop order),
# which costs ~1e-6 here, while any indexing or routing mistake costs ~1.
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


# --------------------------------------------------------------------------- the suite

@dataclass(frozen=True)
class ConvShape:
    """A conv layer: input (N, C, H, W), F filters of K x K, stride S, padding P, G groups."""

    name: str
    n: int
    c: int
    h: int
    w: int
    f: int
    k: int
    s: int
    p: int
    groups: int = 1
    kind: str = field(default="conv", init=False)

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h + 2 * self.p - self.k) // self.s + 1,
                (self.w + 2 * self.p - self.k) // self.s + 1)

    def flops_forward(self, n: int | None = None) -> float:
        """Multiply-adds x 2 of the forward pass: 2 N F OH OW (C/G) KH KW."""
        oh, ow = self.out_hw
        return 2.0 * (self.n if n is None else n) * self.f * oh * ow * self.c // self.groups * self.k * self.k

    def im2col_bytes(self, itemsize: int = DTYPE.itemsize) -> int:
        """Size of one im2col buffer: N OH OW C KH KW x itemsize."""
        oh, ow = self.out_hw
        return self.n * oh * ow * self.c * self.k * self.k * itemsize

    def describe(self) -> str:
        return (f"N={self.n} C={self.c} {self.h}x{self.w} F={self.f} K={self.k} "
                f"S={self.s} P={self.p}" + (f" G={self.groups}" if self.groups > 1 else ""))


@dataclass(frozen=True)
class PoolShape:
    """A pooling layer (``mode`` "max" or "mean") of K x K windows with stride S, no padding."""

    name: str
    mode: str
    n: int
    c: int
    h: int
    w: int
    k: int
    s: int
    kind: str = field(default="pool", init=False)

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h - self.k) // self.s + 1, (self.w - self.k) // self.s + 1)

    def input_bytes(self, itemsize: int = DTYPE.itemsize) -> int:
        return self.n * self.c * self.h * self.w * itemsize

    def describe(self) -> str:
        return f"{self.mode} N={self.n} C={self.c} {self.h}x{self.w} K={self.k} S={self.s}"


CONV_SUITE = [
    ConvShape("lenet-c1", 64, 1, 28, 28, 6, 5, 1, 2),
    ConvShape("lenet-c2", 64, 6, 14, 14, 16, 5, 1, 0),
    ConvShape("cifar", 64, 32, 32, 32, 64, 3, 1, 1),
    ConvShape("vgg", 16, 64, 56, 56, 64, 3, 1, 1),
    ConvShape("resnet-s2", 32, 128, 28, 28, 128, 3, 2, 1),
    ConvShape("depthwise", 32, 64, 32, 32, 64, 3, 1, 1, groups=64),  # a MobileNet block's 3x3
]
POOL_SUITE = [
    PoolShape("pool-max", "max", 64, 32, 32, 32, 2, 2),
    PoolShape("pool-mean", "mean", 64, 32, 32, 32, 2, 2),
]
SUITE = {s.name: s for s in CONV_SUITE + POOL_SUITE}


@dataclass
class Options:
    """How hard to measure. ``quick()`` gives the smoke-test settings."""

    reference: bool = True
    torch: bool = True
    network: bool = True
    resnet: bool = True          # ResNet training steps and batch norm vs torch
    ref_images: int = 2          # images the loop reference runs on (scaled per image)
    ref_limit_s: float = 20.0    # skip a reference phase where one image takes longer
    ref_budget_s: float = 3.0    # time spent repeating a reference measurement
    budget_s: float = 1.5        # time spent repeating a vectorized / torch measurement
    min_repeats: int = 5
    warmup: int = 1
    gemm_n: int = 2048
    memory: bool = True
    profile: bool = False        # cProfile the vectorized forward + backward (where its time goes)
    threads: int | None = None   # BLAS and torch threads (None: torch gets every core, BLAS as set)
    loaded: bool = True          # idle vs loaded figures: 1 and 2 threads and "auto", with busy processes
    loaded_rounds: int = 5
    seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        base = dict(network=False, resnet=False, loaded=False, ref_images=1, ref_budget_s=0.3, budget_s=0.2,
                    min_repeats=2,
                    gemm_n=1024)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- torch

def load_torch(threads: int | None = None) -> tuple[Any, str | None]:
    """Import torch with ``threads`` threads (default: every core); return (module or None, why not)."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install
        return None, f"torch not importable ({type(exc).__name__}: {exc})"
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch, None


def _reference_missing() -> str | None:
    """Why the loop reference cannot run, or None when it can."""
    try:
        import convnet.reference  # noqa: F401
    except ImportError as exc:
        return f"convnet.reference not importable ({exc})"
    return None


# --------------------------------------------------------------------------- checks

def compare(what: str, got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Max error of ``got`` relative to the largest magnitude of ``want``; pass if within TOLERANCE."""
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        return {"what": what, "pass": False, "error": f"shape {got.shape} != {want.shape}"}
    if not np.all(np.isfinite(got)):
        return {"what": what, "pass": False, "error": "non-finite values"}
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    rel = err / scale if scale > 0 else err
    tol = TOLERANCE[np.dtype(want.dtype)] if np.dtype(want.dtype) in TOLERANCE else 1e-4
    return {"what": what, "pass": bool(rel <= tol), "rel_err": rel, "tol": tol}


def compare_all(prefix: str, names: tuple[str, ...], got: tuple, want: tuple) -> list[dict[str, Any]]:
    return [compare(f"{prefix}: {n}", g, w) for n, g, w in zip(names, got, want)]


# --------------------------------------------------------------------------- one case

def _numpy_result(out: Any) -> Any:
    return tuple(np.asarray(o) for o in out) if isinstance(out, tuple) else np.asarray(out)


class CaseRunner:
    """Measures one conv or pool shape for every implementation and checks the results."""

    def __init__(self, shape: ConvShape | PoolShape, opts: Options, torch: Any, gemm_gflops: float,
                 torch_reason: str | None = None):
        self.shape = shape
        self.torch_reason = torch_reason
        self.opts = opts
        self.torch = torch
        self.gemm_gflops = gemm_gflops
        rng = np.random.default_rng(opts.seed)
        sh = shape
        self.x = rng.standard_normal((sh.n, sh.c, sh.h, sh.w), dtype=np.float32)
        oh, ow = sh.out_hw
        if sh.kind == "conv":
            fan_in = sh.c // sh.groups * sh.k * sh.k
            self.w = rng.standard_normal((sh.f, sh.c // sh.groups, sh.k, sh.k), dtype=np.float32) / np.float32(
                math.sqrt(fan_in))
            self.b = rng.standard_normal(sh.f, dtype=np.float32)
            self.dy = rng.standard_normal((sh.n, sh.f, oh, ow), dtype=np.float32)
        else:
            self.dy = rng.standard_normal((sh.n, sh.c, oh, ow), dtype=np.float32)
        self.record: dict[str, Any] = {
            "name": sh.name, "kind": sh.kind, "params": {k: v for k, v in asdict(sh).items()
                                                         if k not in ("name", "kind")},
            "impls": {}, "checks": [],
        }
        if sh.kind == "pool":
            self.record["timed_as"] = {
                "forward": "max_pool2d" if sh.mode == "max" else "avg_pool2d",
                "forward_backward": ("max_pool2d_with_argmax + max_pool2d_backward(argmax=...)" if sh.mode == "max"
                                     else "avg_pool2d + avg_pool2d_backward")}

    # -- the three implementations, as (forward, forward+backward) closures on a batch

    def vectorized(self, x: np.ndarray, dy: np.ndarray) -> tuple[Callable, Callable]:
        import convnet.functional as F
        sh = self.shape
        if sh.kind == "conv":
            w, b, kw = self.w, self.b, dict(stride=sh.s, padding=sh.p, groups=sh.groups)

            def fwd():
                return F.conv2d(x, w, b, **kw)

            def fwd_bwd():
                y, cache = F.conv2d_with_cache(x, w, b, **kw)
                return (y,) + tuple(F.conv2d_backward(dy, x, w, cache=cache, **kw))
            return fwd, fwd_bwd
        if sh.mode == "max":  # as the MaxPool2d layer: the forward keeps the arg-max for the backward
            def mfwd():
                return F.max_pool2d(x, sh.k, sh.s)

            def mfwd_bwd():
                y, argmax = F.max_pool2d_with_argmax(x, sh.k, sh.s)
                return y, F.max_pool2d_backward(dy, x, sh.k, sh.s, argmax=argmax)
            return mfwd, mfwd_bwd

        def pfwd():
            return F.avg_pool2d(x, sh.k, sh.s)

        def pfwd_bwd():
            return F.avg_pool2d(x, sh.k, sh.s), F.avg_pool2d_backward(dy, x, sh.k, sh.s)
        return pfwd, pfwd_bwd

    def winograd_missing(self) -> str | None:
        """Why this case has no Winograd rows, or None."""
        sh = self.shape
        if sh.kind != "conv" or sh.k != 3 or sh.s != 1 or sh.groups != 1:
            return "Winograd computes stride-1 3x3 convolutions without groups only"
        from convnet import _winograd
        return None if _winograd.available() else _winograd.status()

    def winograd(self) -> tuple[Callable, Callable]:
        """The engine forced onto the Winograd algorithm (forward, and both gradients)."""
        import convnet.functional as F
        sh = self.shape
        x, dy, w, b, kw = self.x, self.dy, self.w, self.b, dict(stride=sh.s, padding=sh.p, algo="winograd")

        def fwd():
            return F.conv2d(x, w, b, **kw)

        def fwd_bwd():
            y, cache = F.conv2d_with_cache(x, w, b, **kw)
            return (y,) + tuple(F.conv2d_backward(dy, x, w, cache=cache, **kw))
        return fwd, fwd_bwd

    def run_winograd(self, names: tuple[str, ...], exact_out: tuple, torch_out: tuple | None,
                     torch_fns: tuple[Callable, Callable] | None) -> dict[str, Any]:
        """Check the Winograd results against the exact engine and torch, then time them in
        alternation with torch (same threads, same load), so their ratio comes from one run."""
        why = self.winograd_missing()
        if why:
            return {"status": "skipped", "reason": why}
        fns = self.winograd()
        out = _numpy_result(fns[1]())
        self.record["checks"] += compare_all("winograd vs vectorized (exact)", names, out, exact_out)
        if torch_out is not None:
            self.record["checks"] += compare_all("winograd vs torch", names, out, torch_out)
        opts, result = self.opts, {}
        for index, phase in enumerate(("forward", "forward_backward")):
            pair = {"winograd": fns[index]}
            if torch_fns is not None:
                pair["torch"] = torch_fns[index]
            timings = _timing.measure_alternating(pair, warmup=opts.warmup, min_rounds=opts.min_repeats,
                                                  budget_s=len(pair) * opts.budget_s)
            result[phase] = timings["winograd"].to_dict()
            if "torch" in timings:
                result[phase]["paired_torch"] = timings["torch"].to_dict()
        return result

    def reference(self, x: np.ndarray, dy: np.ndarray) -> tuple[Callable, Callable]:
        import convnet.reference as R
        sh = self.shape
        if sh.kind == "conv":
            w, b, kw = self.w, self.b, dict(stride=sh.s, padding=sh.p, groups=sh.groups)

            def fwd():
                return R.conv2d(x, w, b, **kw)

            def fwd_bwd():
                return (R.conv2d(x, w, b, **kw),) + tuple(R.conv2d_backward(dy, x, w, **kw))
            return fwd, fwd_bwd
        pool, pool_bwd = ((R.max_pool2d, R.max_pool2d_backward) if sh.mode == "max"
                          else (R.avg_pool2d, R.avg_pool2d_backward))

        def pfwd():
            return pool(x, sh.k, sh.s)

        def pfwd_bwd():
            return pool(x, sh.k, sh.s), pool_bwd(dy, x, sh.k, sh.s)
        return pfwd, pfwd_bwd

    def torch_fns(self) -> tuple[Callable, Callable]:
        torch = self.torch
        tf = torch.nn.functional
        sh = self.shape
        x = torch.from_numpy(self.x)
        dy = torch.from_numpy(self.dy)
        xg = torch.from_numpy(self.x.copy()).requires_grad_(True)
        if sh.kind == "conv":
            w, b = torch.from_numpy(self.w), torch.from_numpy(self.b)
            wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    return tf.conv2d(x, w, b, stride=sh.s, padding=sh.p, groups=sh.groups)

            def fwd_bwd():
                y = tf.conv2d(xg, wg, bg, stride=sh.s, padding=sh.p, groups=sh.groups)
                return (y.detach(),) + torch.autograd.grad(y, (xg, wg, bg), dy)
        else:
            op = tf.max_pool2d if sh.mode == "max" else tf.avg_pool2d

            def fwd():
                with torch.no_grad():
                    return op(x, sh.k, sh.s)

            def fwd_bwd():
                y = op(xg, sh.k, sh.s)
                return (y.detach(),) + torch.autograd.grad(y, (xg,), dy)
        return fwd, fwd_bwd

    # -- measurement

    def _timed(self, fns: tuple[Callable, Callable], **kw: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for phase, fn in zip(("forward", "forward_backward"), fns):
            timing, _ = _timing.measure(fn, **kw)
            out[phase] = timing.to_dict()
        return out

    def _grad_names(self) -> tuple[str, ...]:
        return ("y", "dx", "dw", "db") if self.shape.kind == "conv" else ("y", "dx")

    def run(self) -> dict[str, Any]:
        opts, rec = self.opts, self.record
        names = self._grad_names()
        kw = dict(warmup=opts.warmup, min_repeats=opts.min_repeats, budget_s=opts.budget_s)

        vec = self.vectorized(self.x, self.dy)
        vec_out = _numpy_result(vec[1]())
        rec["checks"] += compare_all("vectorized forward vs forward+backward", ("y",),
                                     (_numpy_result(vec[0]()),), vec_out[:1])
        rec["impls"]["vectorized"] = self._timed(vec, **kw)

        tfns = torch_out = None
        if self.torch is not None:
            tfns = self.torch_fns()
            torch_out = tuple(t.numpy() for t in tfns[1]())
            rec["checks"] += compare_all("vectorized vs torch", names, vec_out, torch_out)
            rec["impls"]["torch"] = self._timed(tfns, **kw)
        else:
            rec["impls"]["torch"] = {"status": "skipped", "reason": self.torch_reason}
        rec["impls"]["winograd"] = self.run_winograd(names, vec_out, torch_out, tfns)

        if not opts.reference:
            rec["impls"]["reference"] = {"status": "skipped", "reason": "--no-reference"}
        elif _reference_missing():
            rec["impls"]["reference"] = {"status": "skipped", "reason": _reference_missing()}
        else:
            rec["impls"]["reference"] = self.run_reference(names)

        if opts.memory:
            rec["memory"] = self.memory(vec)
        if opts.profile:
            rec["profile"] = _timing.profile_top(vec[1], repeats=3)
        self.finish()
        return rec

    def run_reference(self, names: tuple[str, ...]) -> dict[str, Any]:
        """Time the loop reference on a few images, scale per image, and check the engine against it.

        Each phase first runs on one image under the ``ref_limit_s`` cap; a phase whose
        single image goes over it is reported as skipped (too slow). A phase that is
        cheap enough is then repeated on ``ref_images`` images within ``ref_budget_s``.
        """
        opts, n = self.opts, self.shape.n
        limit = opts.ref_limit_s
        result: dict[str, Any] = {"scaled_to_batch": n, "limit_s": limit}
        labels = {"forward": "forward", "forward_backward": "forward+backward"}
        for index, phase in enumerate(("forward", "forward_backward")):
            if index and "status" in result["forward"]:
                result[phase] = {"status": "skipped", "reason": "the forward was already too slow"}
                continue
            try:
                with _timing.time_limit(limit):
                    single, out = _timing.measure(self.reference(self.x[:1], self.dy[:1])[index],
                                                  warmup=0, min_repeats=1, max_repeats=1)
            except _timing.TimeLimitExceeded:
                result[phase] = {"status": "skipped",
                                 "reason": f"too slow: one image's {labels[phase]} took over {limit:g} s"}
                continue
            images, timing = 1, single
            more = max(1, min(opts.ref_images, n))
            if more > 1 and single.median * more <= limit / 2:
                try:
                    with _timing.time_limit(limit):
                        timing, out = _timing.measure(
                            self.reference(self.x[:more], self.dy[:more])[index], warmup=0,
                            min_repeats=1, max_repeats=10, budget_s=opts.ref_budget_s)
                    images = more
                except _timing.TimeLimitExceeded:
                    pass  # keep the one-image figure
            elif single.median < opts.ref_budget_s / 2:
                extra, _ = _timing.measure(self.reference(self.x[:1], self.dy[:1])[index], warmup=0,
                                           min_repeats=1, max_repeats=9,
                                           budget_s=opts.ref_budget_s - single.median)
                timing = _timing.Timing(single.times + extra.times)
            result[phase] = {**timing.to_dict(scale=n / images), "measured_median_s": timing.median,
                             "images": images}
            # The engine on the same images, as the witness saw them.
            vec_out = _numpy_result(self.vectorized(self.x[:images], self.dy[:images])[index]())
            got, want = ((vec_out,), (_numpy_result(out),)) if index == 0 else (vec_out, _numpy_result(out))
            self.record["checks"] += compare_all(
                f"vectorized vs reference {labels[phase]} ({images} image(s))",
                ("y",) if index == 0 else names, got, want)
        return result

    def memory(self, vec: tuple[Callable, Callable]) -> dict[str, Any]:
        """Peak extra bytes of the vectorized forward and forward + backward (outputs included)."""
        sh = self.shape
        ref_bytes = sh.im2col_bytes() if sh.kind == "conv" else sh.input_bytes()
        mem = {"baseline": "im2col" if sh.kind == "conv" else "input", "baseline_bytes": ref_bytes}
        from convnet import core

        for phase, fn in zip(("forward", "forward_backward"), vec):
            # Scratch arrays persist between calls: free them so this call's peak counts them.
            core.release_scratch()
            peak = _timing.peak_extra_bytes(fn)
            mem[f"{phase}_peak_bytes"] = peak
            mem[f"{phase}_ratio"] = peak / ref_bytes
        return mem

    def finish(self) -> None:
        """Refuse failed results; add ratios and rates."""
        rec = self.record
        failed = [c for c in rec["checks"] if not c["pass"]]
        rec["status"] = "FAILED" if failed else "ok"
        if failed:
            # A wrong result is not a benchmark figure: drop every time of this case.
            for impl, data in rec["impls"].items():
                if "status" not in data:
                    rec["impls"][impl] = {"status": "FAILED", "reason": "result check failed"}
            rec.pop("memory", None)
            return
        impls = rec["impls"]

        def med(impl: str, phase: str) -> float | None:
            d = impls.get(impl, {}).get(phase)
            return d.get("median_s") if isinstance(d, dict) else None

        ratios: dict[str, Any] = {}
        for phase in ("forward", "forward_backward"):
            v, t, r = med("vectorized", phase), med("torch", phase), med("reference", phase)
            ratios[phase] = {
                "vectorized_over_torch": v / t if v and t else None,
                "reference_over_vectorized": r / v if v and r else None,
            }
            wino = impls.get("winograd", {}).get(phase)
            if isinstance(wino, dict) and "paired_torch" in wino:
                ratios[phase]["winograd_over_torch"] = wino["median_s"] / wino["paired_torch"]["median_s"]
        rec["ratios"] = ratios
        if self.shape.kind == "conv":
            flops = {"forward": self.shape.flops_forward(),
                     "forward_backward": 3 * self.shape.flops_forward()}
            rec["flops"] = flops
            rates = {}
            for impl in ("vectorized", "torch"):
                for phase in flops:
                    m = med(impl, phase)
                    if m:
                        g = flops[phase] / m / 1e9
                        rates.setdefault(impl, {})[phase] = {
                            "gflops": g, "gemm_fraction": g / self.gemm_gflops}
            rec["rates"] = rates
            rec["im2col_bytes"] = self.shape.im2col_bytes()


# --------------------------------------------------------------------------- whole network

def network_throughput(opts: Options, torch: Any) -> dict[str, Any]:
    """Training throughput (images/s) of the default network for one epoch of the bundled digits."""
    try:
        from _network import run_network  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"status": "skipped", "reason": f"network benchmark unavailable ({exc})"}
    return run_network(opts, torch)


def resnet_throughput(opts: Options, torch: Any) -> dict[str, Any]:
    """ResNet-8/20 training steps and batch norm forward + backward, convnet vs torch."""
    try:
        from _resnet import run_resnets  # type: ignore[import-not-found]
    except ImportError as exc:
        return {"status": "skipped", "reason": f"ResNet benchmark unavailable ({exc})"}
    return run_resnets(opts, torch)


def loaded_figures(opts: Options, torch: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The default network's step and the cifar conv layer, idle and with busy processes."""
    import _loaded  # type: ignore[import-not-found]

    return _loaded.run_loaded(torch, SUITE["cifar"], rounds=opts.loaded_rounds, log=log)


# --------------------------------------------------------------------------- targets

# Whole-network and busy-machine targets: the default network's training step against torch's
# (convnet's default threads vs torch's best), idle and loaded, and the default thread policy
# within a factor of the best fixed thread count in every condition.
TARGET_STEP_TORCH_IDLE = 0.7
TARGET_STEP_TORCH_LOADED = 0.6
TARGET_AUTO_OVER_BEST = 1.5


def evaluate_targets(cases: list[dict[str, Any]], loaded: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The targets, each with its measured value and pass/fail (None = not measured)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, limit: float, note: str = "") -> None:
        ok = None if value is None else (value >= limit if op == ">=" else value <= limit)
        rows.append({"target": name, "value": value, "op": op, "limit": limit, "pass": ok,
                     "note": note})

    convs = [c for c in cases if c["kind"] == "conv" and c.get("status") == "ok"]
    pools = [c for c in cases if c["kind"] == "pool" and c.get("status") == "ok"]
    for c in convs:
        for phase, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            r = c["ratios"][phase]["reference_over_vectorized"]
            if r is not None:
                add(f"{c['name']} {label}: vectorized speedup over loop reference", r, ">=",
                    TARGET_REF_SPEEDUP)
    # Grouped layers have their own target; the geometric mean is over the dense ones.
    grouped = [c for c in convs if c.get("params", {}).get("groups", 1) > 1]
    for c in grouped:
        add(f"{c['name']} fwd+bwd time vs torch", c["ratios"]["forward_backward"]["vectorized_over_torch"], "<=",
            TARGET_GROUPED_TORCH)
    torch_fb = [(c["name"], c["ratios"]["forward_backward"]["vectorized_over_torch"]) for c in convs
                if c not in grouped]
    torch_fb = [(n, r) for n, r in torch_fb if r is not None]
    if torch_fb:
        gm = math.exp(sum(math.log(r) for _, r in torch_fb) / len(torch_fb))
        missing = sorted({s.name for s in CONV_SUITE if s.groups == 1} - {n for n, _ in torch_fb})
        add("conv fwd+bwd time vs torch, geometric mean", gm, "<=", TARGET_TORCH_GEOMEAN,
            f"over {len(torch_fb)} shape(s)" + (f"; not run: {', '.join(missing)}" if missing else ""))
        for n, r in torch_fb:
            add(f"{n} fwd+bwd time vs torch", r, "<=", TARGET_TORCH_MAX)
    for c in convs:
        r = c["ratios"]["forward_backward"].get("winograd_over_torch")
        if r is not None:
            add(f"{c['name']} fwd+bwd: Winograd time vs torch (alternating)", r, "<=", TARGET_WINOGRAD_TORCH)
    for c in pools:
        r = c["ratios"]["forward_backward"]["vectorized_over_torch"]
        if r is not None:
            add(f"{c['name']} fwd+bwd time vs torch", r, "<=", TARGET_POOL_TORCH)
    for c in convs:
        if "memory" in c:
            add(f"{c['name']} forward peak extra memory / one im2col buffer",
                c["memory"]["forward_ratio"], "<=", TARGET_FWD_MEMORY)
    for row in (loaded or {}).get("summary", []):
        where = f"{row['workload']}, {row['condition']}"
        if row["workload"].startswith("lenet") and row["throughput_vs_torch_auto"] is not None:
            idle = row["condition"] == "idle"
            add(f"{where}: throughput vs torch (default threads vs torch's best)", row["throughput_vs_torch_auto"],
                ">=", TARGET_STEP_TORCH_IDLE if idle else TARGET_STEP_TORCH_LOADED)
        add(f"{where}: default threads time / best fixed threads", row["auto_over_best_fixed"], "<=",
            TARGET_AUTO_OVER_BEST)
    return rows


# --------------------------------------------------------------------------- printing

def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:,.0f}x" if r >= 100 else f"{r:.2f}x"


def fmt_mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _time_cell(case: dict[str, Any], impl: str, phase: str) -> str:
    data = case["impls"].get(impl, {})
    if "status" in data:
        return {"FAILED": "FAILED", "skipped": "skipped"}.get(data["status"], data["status"])
    d = data.get(phase)
    if not isinstance(d, dict):
        return "-"
    if "status" in d:
        return d["status"]
    return fmt_time(d["median_s"]) + ("*" if impl == "reference" else "")


def render(report: dict[str, Any]) -> str:
    out: list[str] = []
    m = report["machine"]
    out.append("convnet benchmark (float32, medians of repeated runs, all in one process)")
    out.append(f"machine: {m['cpu']} | {m['cpu_count']} CPUs ({m['usable_cpus']} usable) | "
               f"{m['system']} | Python {m['python']} | numpy {m['numpy']}")
    for pool in m["blas"]:
        desc = ", ".join(f"{k}={v}" for k, v in pool.items() if k != "user_api")
        out.append(f"  {pool.get('user_api', 'pool')}: {desc}")
    thr = report["threads"]
    out.append(f"threads: numpy BLAS {thr['numpy_blas']}, torch {thr['torch']} "
               f"(os.cpu_count() = {thr['cpu_count']})" + (f"; {thr['note']}" if thr.get("note") else ""))
    if report.get("gemm_path"):
        out.append(f"convnet GEMM: {report['gemm_path']}")
    if m["env"]:
        out.append("env: " + " ".join(f"{k}={v}" for k, v in m["env"].items()))
    out.append(f"torch: {report['torch']}")
    g = report["gemm"]
    out.append(f"float32 GEMM rate: {g['gflops']:.1f} GFLOP/s (numpy matmul {g['n']}x{g['n']}, "
               f"median {fmt_time(g['median_s'])})")
    parts = [("GEMM probe", report["gemm"])] + [(c["name"], c) for c in report["cases"]]
    for part in ("network", "resnet"):
        if report.get(part):
            parts.append((part, report[part]))
    busy = [(n, d["other_load"]) for n, d in parts if (d.get("other_load") or 0) > BUSY_WARN]
    if busy:
        out.append("WARNING: other processes used the CPUs during "
                   + ", ".join(f"{n} ({100 * f:.0f}% of the machine)" for n, f in busy)
                   + "; BLAS threads then wait for each other and those figures are unreliable")
    cases = report["cases"]
    ref_note = sorted({d["images"] for c in cases for d in c["impls"].get("reference", {}).values()
                       if isinstance(d, dict) and "images" in d})
    out.append("")
    out.append("Times (median per batch). " + (
        "* = loop reference timed on " + " or ".join(map(str, ref_note))
        + " image(s) and scaled to the batch size." if ref_note else "Loop reference not run."))
    rows = []
    for c in cases:
        rows.append([c["name"], _time_cell(c, "reference", "forward"), _time_cell(c, "vectorized", "forward"),
                     _time_cell(c, "torch", "forward"), _time_cell(c, "reference", "forward_backward"),
                     _time_cell(c, "vectorized", "forward_backward"),
                     _time_cell(c, "torch", "forward_backward")])
    out.append(table(["shape", "ref fwd", "vec fwd", "torch fwd", "ref fwd+bwd", "vec fwd+bwd",
                      "torch fwd+bwd"], rows))
    if any(c["kind"] == "pool" and c.get("params", {}).get("mode") == "max" for c in cases):
        out.append("Max pooling vec fwd+bwd = max_pool2d_with_argmax + max_pool2d_backward(argmax=...), as the "
                   "MaxPool2d layer runs it (torch's autograd keeps its indices too); vec fwd = max_pool2d.")

    out.append("")
    out.append("Ratios and rates (vec/torch: < 1 means faster than torch; ref/vec: speedup over the loop "
               "reference; GFLOP/s of the vectorized engine, fwd+bwd counted as 3x fwd)")
    rows = []
    for c in cases:
        if c.get("status") != "ok":
            rows.append([c["name"], c.get("status", "?")] + [""] * 7)
            continue
        r = c["ratios"]
        rates = c.get("rates", {}).get("vectorized", {})
        trates = c.get("rates", {}).get("torch", {})

        def rate(d: dict, phase: str, key: str, pct: bool = False) -> str:
            v = d.get(phase, {}).get(key)
            return "-" if v is None else (f"{100 * v:.0f}%" if pct else f"{v:.1f}")
        rows.append([c["name"], fmt_ratio(r["forward"]["vectorized_over_torch"]),
                     fmt_ratio(r["forward_backward"]["vectorized_over_torch"]),
                     fmt_ratio(r["forward"]["reference_over_vectorized"]),
                     fmt_ratio(r["forward_backward"]["reference_over_vectorized"]),
                     rate(rates, "forward", "gflops"), rate(rates, "forward_backward", "gflops"),
                     rate(rates, "forward", "gemm_fraction", True) + " / "
                     + rate(rates, "forward_backward", "gemm_fraction", True),
                     rate(trates, "forward_backward", "gflops")])
    out.append(table(["shape", "vec/torch fwd", "vec/torch f+b", "ref/vec fwd", "ref/vec f+b",
                      "GFLOP/s fwd", "GFLOP/s f+b", "%GEMM fwd / f+b", "torch GFLOP/s f+b"], rows))

    wino_cases = [c for c in cases if c.get("status") == "ok" and "status" not in c["impls"].get("winograd", {})]
    if wino_cases:
        out.append("")
        out.append("Winograd F(4x4, 3x3) (convnet[fast], compiled with numba), timed in alternation with torch "
                   "(same threads); error: max |winograd - torch| / max |torch| of y, dx, dw")
        rows = []
        for c in wino_cases:
            wino, r = c["impls"]["winograd"], c["ratios"]
            errs = {k["what"].split(": ")[1]: k["rel_err"] for k in c["checks"]
                    if k["what"].startswith("winograd vs torch")}

            paired = {phase: wino[phase].get("paired_torch", {}).get("median_s")
                      for phase in ("forward", "forward_backward")}
            rows.append([c["name"], fmt_time(wino["forward"]["median_s"]), fmt_time(paired["forward"]),
                         fmt_ratio(r["forward"].get("winograd_over_torch")),
                         fmt_time(wino["forward_backward"]["median_s"]), fmt_time(paired["forward_backward"]),
                         fmt_ratio(r["forward_backward"].get("winograd_over_torch")),
                         " / ".join(f"{errs[n]:.1e}" for n in ("y", "dx", "dw") if n in errs) or "-"])
        out.append(table(["shape", "wino fwd", "torch fwd", "ratio", "wino f+b", "torch f+b", "ratio",
                          "error y / dx / dw"], rows))

    mem_cases = [c for c in cases if "memory" in c]
    if mem_cases:
        out.append("")
        out.append("Peak extra memory of the vectorized engine (tracemalloc; outputs and caches included), "
                   "next to one im2col buffer (conv) or the input (pool)")
        rows = []
        for c in mem_cases:
            mm = c["memory"]
            rows.append([c["name"], f"{mm['baseline']} {fmt_mib(mm['baseline_bytes'])}",
                         f"{fmt_mib(mm['forward_peak_bytes'])} ({mm['forward_ratio']:.2f}x)",
                         f"{fmt_mib(mm['forward_backward_peak_bytes'])} ({mm['forward_backward_ratio']:.2f}x)"])
        out.append(table(["shape", "baseline", "fwd peak", "fwd+bwd peak"], rows))

    prof_cases = [c for c in cases if c.get("profile")]
    if prof_cases:
        out.append("")
        out.append("Profile of the vectorized forward + backward (cProfile, own time per function; "
                   "a BLAS call counts in the function that makes it)")
        for c in prof_cases:
            pr = c["profile"]
            out.append(f"  {c['name']}: {fmt_time(pr['total_s'])} per call under the profiler")
            for fn in pr["top"]:
                out.append(f"    {100 * fn['share']:5.1f}%  {fn['calls']:6d} calls  {fn['function']}")

    out.append("")
    out.append("Result checks (max error / max |witness|):")
    for c in cases:
        bad = [k for k in c["checks"] if not k["pass"]]
        if c.get("status") == "ERROR":
            out.append(f"  {c['name']}: ERROR {c.get('error', '')}")
        elif bad:
            for k in bad:
                out.append(f"  {c['name']}: FAILED {k['what']}: "
                           + (k.get("error") or f"rel err {k['rel_err']:.2e} > tol {k['tol']:.0e}"))
        else:
            worst = max((k["rel_err"] for k in c["checks"]), default=0.0)
            witnesses = sorted({k["what"].split(":")[0] for k in c["checks"]})
            out.append(f"  {c['name']}: ok ({len(c['checks'])} arrays, worst rel err {worst:.1e}; "
                       f"{'; '.join(witnesses)})")

    net = report.get("network")
    if net is not None:
        out.append("")
        out.append("Whole network: training throughput, one epoch of the bundled digits")
        if net.get("status") and net["status"] != "ok":
            out.append(f"  {net['status']}: {net.get('reason', '')}")
        else:
            for line in net.get("lines", []):
                out.append("  " + line)

    res = report.get("resnet")
    if res is not None:
        out.append("")
        out.append("ResNets (CIFAR-10 shapes) and batch norm, convnet vs torch")
        if res.get("status") and res["status"] not in ("ok", "FAILED"):
            out.append(f"  {res['status']}: {res.get('reason', '')}")
        else:
            for line in res.get("lines", []):
                out.append("  " + line)

    loaded = report.get("loaded")
    if loaded is not None:
        out.append("")
        if loaded.get("status") == "ERROR":
            out.append(f"Idle and loaded: ERROR {loaded.get('reason', '')}")
        else:
            import _loaded  # type: ignore[import-not-found]
            out += _loaded.render_loaded(loaded)

    out.append("")
    out.append("Targets:")
    rows = []
    for t in report["targets"]:
        v = t["value"]
        val = "-" if v is None else (fmt_ratio(v) if "speedup" in t["target"] or "torch" in t["target"]
                                     else f"{v:.2f}x")
        mark = {True: "pass", False: "MISS", None: "n/a"}[t["pass"]]
        rows.append([t["target"], val, f"{t['op']} {fmt_ratio(t['limit'])}", mark, t.get("note", "")])
    if rows:
        out.append(table(["target", "measured", "goal", "", ""], rows))
        passed = sum(t["pass"] is True for t in report["targets"])
        out.append(f"{passed} of {len(rows)} targets met.")
    else:
        out.append("  (none measured)")
    out.append("")
    out.append("RESULT: " + ("all results correct" if report["ok"] else
                             "WRONG RESULTS OR ERRORS (see above); exit status 1"))
    return "\n".join(out)


# --------------------------------------------------------------------------- driver

def write_json_atomic(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (readers never see half a file), with the user's umask."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path) as fh:
        fh.write((json.dumps(data, indent=1) + "\n").encode("utf-8"))


def _blas_threads(machine: dict[str, Any]) -> int | None:
    for pool in machine["blas"]:
        if pool.get("user_api") == "blas" and "num_threads" in pool:
            return pool["num_threads"]
    return None


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(shapes: list[ConvShape | PoolShape], opts: Options,
        log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Measure ``shapes``; return the report (``report["ok"]`` is False on a wrong result or error).

    With ``opts.threads`` set, numpy's BLAS (through threadpoolctl) and torch both
    use that many threads for the whole run; otherwise torch gets every core and
    BLAS keeps its own setting (both are printed).
    """
    with _timing.blas_threads(opts.threads) as blas_note:
        report = _run(shapes, opts, log)
    if blas_note:
        report["threads"]["note"] = blas_note
    return report


def _run(shapes: list[ConvShape | PoolShape], opts: Options, log: Callable[[str], None]) -> dict[str, Any]:
    torch, torch_reason = (load_torch(opts.threads) if opts.torch else (None, "--no-torch"))
    machine = _timing.machine_info()
    report: dict[str, Any] = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "threads": {"cpu_count": os.cpu_count(), "numpy_blas": _blas_threads(machine),
                    "torch": torch.get_num_threads() if torch is not None else None},
        "torch": (f"{torch.__version__}" if torch is not None else f"not used: {torch_reason}"),
        "options": asdict(opts),
        "dtype": str(DTYPE),
    }
    import convnet
    from convnet import _blas
    report["convnet"] = getattr(convnet, "__version__", None)
    report["gemm_path"] = str(_blas.backend())
    log(f"measuring the float32 GEMM rate ({opts.gemm_n}x{opts.gemm_n}) ...")
    with _timing.OtherLoad() as load:
        report["gemm"] = _timing.gemm_rate(opts.gemm_n, budget_s=opts.budget_s,
                                           min_repeats=max(3, opts.min_repeats))
    report["gemm"]["other_load"] = load.fraction
    cases = []
    for shape in shapes:
        log(f"{shape.name}: {shape.describe()} ...")
        runner = CaseRunner(shape, opts, torch, report["gemm"]["gflops"], torch_reason)
        try:
            with _timing.OtherLoad() as load:
                rec = runner.run()
        except Exception as exc:  # report it, go on with the other shapes, exit non-zero
            rec = runner.record
            rec["status"] = "ERROR"
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec["traceback"] = traceback.format_exc()
            log(rec["traceback"])
        rec["other_load"] = load.fraction
        cases.append(rec)
    report["cases"] = cases
    if opts.network:
        log("whole network: one training epoch ...")
        report["network"] = _section(lambda: network_throughput(opts, torch), log, measure_load=True)
    if opts.resnet:
        log("ResNets: training steps and batch norm ...")
        report["resnet"] = _section(lambda: resnet_throughput(opts, torch), log, measure_load=True)
    if opts.loaded:
        log("idle and loaded: BLAS threads with competing busy processes ...")
        report["loaded"] = _section(lambda: loaded_figures(opts, torch, log), log)
    report["targets"] = evaluate_targets(cases, report.get("loaded"))

    network_ok = all(report.get(part, {}).get("status") not in ("ERROR", "FAILED")
                     for part in ("network", "resnet")) and report.get("loaded", {}).get("status") != "ERROR"
    report["ok"] = all(c.get("status") == "ok" for c in cases) and network_ok
    return report


def _section(run: Callable[[], dict[str, Any]], log: Callable[[str], None],
             measure_load: bool = False) -> dict[str, Any]:
    """One section of the report: ``run()``'s dict, or an ERROR record with the traceback
    (logged), so the other sections still run; with ``measure_load``, the other processes'
    share of the machine meanwhile as ``other_load``."""
    load = _timing.OtherLoad()
    try:
        with load if measure_load else contextlib.nullcontext():
            result = run()
    except Exception as exc:
        result = {"status": "ERROR", "reason": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        log(result["traceback"])
    if measure_load:
        result["other_load"] = load.fraction
    return result


def _parse_conv(text: str) -> ConvShape:
    try:
        name, spec = text.split("=", 1)
        values = [int(v) for v in spec.split(",")]
        if len(values) not in (8, 9):
            raise ValueError(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--conv wants NAME=N,C,H,W,F,K,S,P[,G], got {text!r}") from None
    return ConvShape(name, *values)


def _parse_pool(text: str) -> PoolShape:
    try:
        name, spec = text.split("=", 1)
        mode, *rest = spec.split(",")
        n, c, h, w, k, s = (int(v) for v in rest)
        if mode not in ("max", "mean"):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--pool wants NAME=max|mean,N,C,H,W,K,S, got {text!r}") from None
    return PoolShape(name, mode, n, c, h, w, k, s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=list(SUITE), metavar="NAME",
                   help=f"run only this suite shape (repeatable): {', '.join(SUITE)}")
    p.add_argument("--conv", action="append", type=_parse_conv, default=[], metavar="NAME=N,C,H,W,F,K,S,P[,G]",
                   help="an extra conv shape (repeatable); with --shape/--conv/--pool only those run")
    p.add_argument("--pool", action="append", type=_parse_pool, default=[], metavar="NAME=MODE,N,C,H,W,K,S",
                   help="an extra pooling shape, MODE max or mean (repeatable)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats, reference on one image, smaller GEMM probe, no whole-network run")
    p.add_argument("--no-reference", action="store_true", help="do not run the loop reference")
    p.add_argument("--no-torch", action="store_true", help="do not use torch even if importable")
    p.add_argument("--no-network", action="store_true", help="skip the whole-network training figure")
    p.add_argument("--resnet", action="store_true",
                   help="run only the ResNet training-step and batch-norm rows (part of the full suite)")
    p.add_argument("--loaded", action=argparse.BooleanOptionalAction, default=None,
                   help="idle vs loaded figures: the default network's training step and the cifar conv "
                        "layer with 1 and 2 BLAS threads and 'auto', vs torch, while the harness runs 0, 1 "
                        "and 2 busy processes of its own (default: on for the whole suite, off with --quick)")
    p.add_argument("--loaded-rounds", type=int, default=None, metavar="N",
                   help="interleaved rounds per condition of the idle vs loaded figures (5)")
    p.add_argument("--ref-images", type=int, default=None, help="images the loop reference runs on")
    p.add_argument("--ref-limit", type=float, default=None,
                   help="skip a loop-reference phase (forward, forward+backward) where one image "
                        "takes longer than this many seconds (20)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="time spent repeating each vectorized/torch measurement (1.5; --quick 0.2)")
    p.add_argument("--gemm-n", type=int, default=None, metavar="N",
                   help="matrix size of the GEMM-rate probe (2048; --quick 1024)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads for numpy's BLAS (needs threadpoolctl) and torch alike; default: torch "
                        "gets every core and BLAS keeps its own setting. 1 gives steadier figures on a "
                        "busy machine")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile the vectorized forward + backward of each shape and print "
                        "where its time goes (BLAS calls count in the Python function that makes them)")
    p.add_argument("--json", default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the JSON report (default benchmarks/results/latest.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = Options.quick() if args.quick else Options()
    opts.reference = not args.no_reference
    opts.torch = not args.no_torch
    opts.network = opts.network and not args.no_network
    opts.profile = args.profile
    if args.loaded is not None:
        opts.loaded = args.loaded
    if args.loaded_rounds is not None:
        if args.loaded_rounds < 1:
            raise SystemExit(f"--loaded-rounds must be >= 1, got {args.loaded_rounds}")
        opts.loaded_rounds = args.loaded_rounds
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        opts.threads = args.threads
    if args.ref_images is not None:
        if args.ref_images < 1:
            raise SystemExit(f"--ref-images must be >= 1, got {args.ref_images}")
        opts.ref_images = args.ref_images
    if args.ref_limit is not None:
        opts.ref_limit_s = args.ref_limit
    if args.budget is not None:
        if not args.budget >= 0:
            raise SystemExit(f"--budget must be >= 0, got {args.budget}")
        opts.budget_s = args.budget
        opts.ref_budget_s = min(opts.ref_budget_s, args.budget)
    if args.gemm_n is not None:
        if args.gemm_n < 1:
            raise SystemExit(f"--gemm-n must be >= 1, got {args.gemm_n}")
        opts.gemm_n = args.gemm_n
    shapes: list[ConvShape | PoolShape] = [SUITE[n] for n in (args.shape or [])] + args.conv + args.pool
    if args.resnet:
        opts.resnet, opts.network = True, False  # only the ResNet rows
        opts.loaded = bool(args.loaded)
    elif shapes:
        opts.network = opts.resnet = False  # the network figures belong to the whole suite
        opts.loaded = bool(args.loaded)  # and so do the loaded figures, unless asked for
    else:
        shapes = CONV_SUITE + POOL_SUITE
    report = run(shapes, opts)
    print(render(report), flush=True)
    write_json_atomic(args.json, report)
    print(f"JSON report: {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
