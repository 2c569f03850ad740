"""The convolution engine: a layer's plan (how to compute it) and the executors that follow it.

:mod:`convnet.functional` validates the arguments of ``conv2d*``, turns them into a
:class:`Geometry`, asks :func:`plan` how to compute the layer and runs :func:`forward` or
:func:`backward`. Nothing here validates: every input arrives canonical. The tuning policy
lives here only, as the one table :data:`THRESHOLDS` read by the one pure function
:func:`plan`; ``tests/test_conv_plan.py`` pins what it chooses for the benchmark layers.

Words, the same as in the public API:

- ``algo``: how a correlation is summed. ``"im2col"`` builds the column matrix and calls
  one GEMM; ``"taps"`` (stride 1) calls one accumulating GEMM per kernel tap on the padded
  input (see :mod:`convnet.core`); ``"winograd"`` (stride-1, dilation-1 3x3 kernels, with
  numba: the ``fast`` extra) transforms 4x4 output tiles so that each costs 36 multiplies
  per channel instead of 144 (see :mod:`convnet._winograd`): faster where the table says,
  exact only up to a larger rounding error. A new algorithm is one more entry of
  :data:`ALGOS`, one more rule in :func:`plan` and one more row of :data:`_FORWARD`.
- ``method``: the route of the input gradient. ``"zero_insert"`` is the tutorial's (zero
  insertion, padding, a stride-1 correlation with the flipped filters); ``"col2im"``
  transposes the forward (``W.T @ dy`` added back onto the windows).
- ``layout``: where the im2col algorithm puts the batch axis. ``"cnhw"`` (C, N, H, W) moves
  whole planes when it converts from NCHW; ``"chwn"`` (C, H, W, N) puts the batch innermost,
  so that on small maps each window row is one long run (see :mod:`convnet.core`).
- A :class:`Plan` holds the forward ``algo``, the input gradient's ``method`` and
  ``dx_algo``, how many images each pass takes at once (its chunks), and the ``layout``.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np

from . import _blas, _winograd, core
from ._args import Pads

Pair = tuple[int, int]

ALGOS = ("im2col", "taps", "winograd")
METHODS = ("zero_insert", "col2im")
LAYOUTS = ("cnhw", "chwn")
# "0" keeps algo="auto" on the exact algorithms (im2col, taps) even where numba is installed;
# "1" (or unset) lets the plan pick Winograd where the table says it is faster.
WINOGRAD_ENV = "CONVNET_WINOGRAD"


class Geometry(NamedTuple):
    """The canonical arguments of one convolution: shapes, stride, pads, dilation, dtype, groups.

    ``x`` is (N, C, H, W), the weight (F, C/groups, KH, KW), the output (N, F, OH, OW).
    ``out_hw`` is the number of window positions; the floor rule gives it for conv2d, and a
    transposed convolution (whose output is this geometry's input) may pass it explicitly.
    """

    n: int
    c: int
    h: int
    w: int
    f: int
    kh: int
    kw: int
    stride: Pair
    pads: Pads
    dilation: Pair
    out_hw: Pair
    dtype: np.dtype
    groups: int = 1

    @classmethod
    def of(cls, x_shape: tuple[int, ...], weight: np.ndarray, stride: Pair, pads: Pads, dilation: Pair,
           out_hw: Pair, groups: int = 1) -> Geometry:
        return cls(*x_shape, weight.shape[0], *weight.shape[2:], stride, pads, dilation, out_hw, weight.dtype,
                   groups)

    @property
    def kernel(self) -> Pair:
        return (self.kh, self.kw)

    @property
    def padded_hw(self) -> Pair:
        return (self.h + sum(self.pads[0]), self.w + sum(self.pads[1]))


class Plan(NamedTuple):
    """How one layer is computed; see the module docstring for the words."""

    algo: str          # forward correlation: "im2col", "taps" or "winograd"
    method: str        # input-gradient route: "zero_insert" or "col2im"
    dx_algo: str       # the input gradient's correlation: "im2col", "taps" or "winograd" (zero_insert)
    fwd_images: int    # images per forward chunk
    bwd_images: int    # images per backward chunk (a backward given a cache takes the batch at once)
    layout: str = "cnhw"  # the im2col algorithm's layout ("cnhw" or "chwn"); other algorithms: "cnhw"


class Thresholds(NamedTuple):
    """The measured constants of :func:`plan`.

    Each was set from side-by-side medians (float32, ``benchmarks/bench.py`` and sweeps
    over the channel count at LeNet and CIFAR sizes, on a 2-core x86 machine with
    OpenBLAS), comparing the two choices on the same layer in the same run. The figures
    are in the comments of :data:`THRESHOLDS`.
    """

    taps_min_channels: int
    cached_taps_min_channels: int
    max_taps_grid_waste: float
    zero_insert_min_channels: int
    transposed_taps_min_channels: int
    winograd_min_size: int
    winograd_min_channels: int
    winograd_min_row_tiles: int
    chwn_max_width: int
    per_image_gemm_max_k: int
    per_image_gemm_min_outputs: int


THRESHOLDS = Thresholds(
    # Forward only (conv2d): the per-tap GEMMs of a stride-1 correlation beat im2col + one
    # GEMM from about 6 input channels on (fwd-only sweeps over C, CNHW engine), where the
    # padded grid is not much larger than the output (max_taps_grid_waste below): on the
    # unpadded 5x5 LeNet layers (grid 1.96x the output) im2col in CHWN took 1.56 vs 2.96 ms
    # (64, 6, 14x14 -> 16) and 2.61 vs 4.71 ms (32, 16 -> 32), 1 thread; with 3x3 pad 1
    # (1.27x) taps still won: 2.21 vs 2.61 ms (64, 8, 16x16 -> 16), 10.0 vs 13.1 ms (C=F=32).
    taps_min_channels=6,
    # Forward with a cache (backward follows): backward must rebuild the column matrix from
    # a taps forward's padded input. Taps still won from 16 channels (CIFAR 40-44 vs 43-45
    # ms, VGG 50-52 vs 55-56 ms fwd + bwd) but lost on LeNet's second layer (C=6: 2.2 vs
    # 1.9 ms).
    cached_taps_min_channels=16,
    # Taps compute every point of the padded grid; where it is much larger than the output
    # (grid / output points above this) they lose even with many channels, forward only or
    # not: the default LeNet's second conv in training, 14x14 -> 10x10 with C=16, F=32:
    # 2.7 ms by im2col and col2im vs 3.1 ms by taps and zero insertion, fwd + bwd. The same
    # bound limits the zero-insertion route, whose padded map is the input grown by the
    # dilated kernel.
    max_taps_grid_waste=1.3,
    # At stride 1, zero insertion measured faster (fwd + bwd) when both sides are wide (C,
    # F >= 16: CIFAR, VGG); both LeNet layers (C=1, F=6 and C=6, F=16) were faster by
    # col2im (1.9 vs 2.1 ms and 1.8 vs 2.4 ms once scratch arrays removed page faults).
    zero_insert_min_channels=16,
    # col2im's sums by per-tap GEMMs (core.transposed_taps) write C rows per tap: they beat
    # dcols + col2im on C=128 (stride 2) and lost on C=1, 6 and 16 (LeNet: 2.8 vs 2.7 ms).
    # Not on maps narrow enough for CHWN: the ResNet-20 8x8 layer (N=128, C=F=64) fwd + bwd
    # took 53.8 ms with them and 44.9 ms by im2col in CHWN (1 thread, medians of 9).
    transposed_taps_min_channels=32,
    # Winograd F(4x4, 3x3), where numba is installed, against the exact plan above (fwd + bwd,
    # float32, 1 BLAS thread, medians of 9 alternating rounds on a busy 2-core machine). Its
    # transforms loop over one tile row of the whole batch (ceil(OW/4) * N tiles), so the
    # batch counts as much as the map. At N=128 it won from 8x8 outputs with 8 channels or
    # more on both sides (8x8, C=F=8: 0.79x; C=F=16: 0.71x; C=F=64: 0.51x; 12x12, C=F=16:
    # 0.66x; 16x16, C=F=8: 0.58x; C=F=16: 0.61x; C=F=32: 0.43x; 32x32, C=F=16: 0.50x; cifar
    # 0.41x, vgg at N=16 0.38x) and lost with 4
    # channels or fewer on a side (8x8, C=F=4: 1.50x; 32x32, C=3, F=16: 1.29x; 16x16, C=4,
    # F=16 won, 0.84x) or on 4x4 maps (C=F=16: 1.17x). Tile rows of 32 tiles tied or won
    # (8x8, N=16, C=F=16 or 32: 1.01-1.03x; 32x32, N=4, C=F=16: 1.01x; 16x16, N=8, C=F=32:
    # 0.85x), shorter ones lost (16x16, C=F=32, N=1, 2, 4: 1.37x, 1.26x, 1.06x; 8x8, C=F=64,
    # N=8: 1.23x) and longer ones won (8x8, N=32, C=F=16: 0.93x; C=F=64: 0.61x; 32x32, N=8:
    # 0.68x).
    winograd_min_size=8,
    winograd_min_channels=8,
    winograd_min_row_tiles=32,
    # The CHWN layout for im2col layers (and their col2im input gradient) whose outputs are
    # at most this wide: window rows of OW elements become runs of OW*N. Measured at batch 32,
    # 1 BLAS thread, fwd + bwd pieces side by side: LeNet's second conv (16 -> 32, 14x14 ->
    # 10x10) im2col 1.52 -> 0.32 ms and col2im 2.64 -> 1.04 ms; the first (1 -> 16, 28x28,
    # pad 2) lost: its output's transpose back to NCHW cost 0.57 ms against 0.07 ms.
    chwn_max_width=16,
    # The CNHW forward's GEMM, one per image straight into NCHW (no temporary, no transpose)
    # against one per quarter batch and a transpose (core.gemm_into_nchw), float32, medians of
    # 21 alternating rounds on the idle machine, 2 threads (1 thread): per image won where the
    # transpose is a large part, short kernels (K = KH*KW*C: LeNet's first conv, K=25, 784
    # outputs, N=64: 0.80x (0.75x); N=32: 0.73x (0.69x); F=6: 0.85x (0.77x); K=72, 256
    # outputs: 0.85x (0.88x)), and where each image's GEMM is large (K=288, 1024 outputs:
    # 0.93x (0.97x)); it lost at 2 threads on long kernels over small maps (K=144, 256
    # outputs, N=128: 1.05x (0.96x); K=288, 64 outputs: 1.18x (0.98x); ResNet's strided
    # layer, K=1152, 196 outputs: 1.18x (1.03x)).
    per_image_gemm_max_k=72,
    per_image_gemm_min_outputs=1024,
)


class _Scratch:
    """Names of this module's scratch arrays (``core.row_buffer(reuse=...)``).

    Each name is one temporary, dead before the call that made it returns; arrays alive
    at the same time have different names. Results and cached data never use them.
    """

    PADDED = "conv.padded"          # padded CNHW copy of x (stride-1 im2col; taps without a cache)
    FWD_COLS = "conv.fwd.cols"      # forward column matrix when no cache keeps it
    FWD_Y = "conv.fwd.y"            # a taps forward's output on the padded grid; a CHWN product
    BWD_COLS = "conv.bwd.cols"      # column matrix rebuilt by backward (no cache, or a taps cache)
    BWD_DY = "conv.bwd.dy"          # dy as CNHW
    BWD_DY_CHWN = "conv.bwd.dy.chwn"  # dy as CHWN
    BWD_DCOLS = "conv.bwd.dcols"    # W.T @ dy (col2im route)
    BWD_DXP = "conv.bwd.dxp"        # the padded input gradient (col2im route)
    BWD_TAPS = "conv.bwd.tt"        # prefix of core.transposed_taps's arrays
    BWD_Z = "conv.bwd.z"            # dy zero-inserted and padded (zero_insert route)
    CORR_COLS = "conv.corr.cols"    # column matrix of the zero_insert route's correlation
    CORR_Y = "conv.corr.y"          # result of the zero_insert route's correlation
    # convnet._winograd names its own scratch arrays ("wino.*").


# --------------------------------------------------------------------------- the plan

def _grid_waste(grid_hw: Pair, out_hw: Pair) -> float:
    """How many more points a taps correlation computes than it keeps."""
    return grid_hw[0] * grid_hw[1] / (out_hw[0] * out_hw[1])


def _workspace(g: Geometry, algo: str, method: str, dx_algo: str, layout: str = "cnhw") -> tuple[int, int]:
    """Bytes of the largest temporaries per image of the forward and of the backward.

    Forward: the column matrix, or for taps the padded input and its padded-grid output.
    Backward: the column matrix of the filter gradient, or the input-gradient route's
    largest arrays (its column matrix and padded sums, or its zero-inserted map).
    """
    (oh, ow), (hp, wp), kk = g.out_hw, g.padded_hw, g.kh * g.kw
    cols = oh * ow * kk * g.c
    fwd = (g.c + g.f) * hp * wp if algo == "taps" else cols
    if layout == "chwn":  # the product before its transpose to NCHW
        fwd += g.f * oh * ow
    if algo == "winograd":  # the transformed tiles of x and of y
        fwd = _winograd.workspace_per_image(g.out_hw, g.c, g.f)
    if dx_algo == "winograd":  # the tiles of dy and dx; the filter gradient's tiles of x and dy, or columns
        dw = _winograd.workspace_per_image(g.out_hw, g.c, g.f) if algo == "winograd" else cols
        dx = _winograd.workspace_per_image((g.h, g.w), g.f, g.c)
        return fwd * g.dtype.itemsize, max(dw, dx) * g.dtype.itemsize
    if method == "col2im":
        dx = (g.f * oh * ow + 2 * g.c * hp * wp) if dx_algo == "taps" else cols + g.c * hp * wp
    else:
        zh, zw = g.h + g.dilation[0] * (g.kh - 1), g.w + g.dilation[1] * (g.kw - 1)
        dx = g.f * zh * zw + (g.c * zh * zw if dx_algo == "taps" else kk * g.f * g.h * g.w)
    return fwd * g.dtype.itemsize, max(cols, dx) * g.dtype.itemsize


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"


def _images(n: int, per_image: int, limit: int, what: str) -> int:
    """Images per chunk under ``limit``; refuses when one image alone exceeds it."""
    if per_image > limit:
        raise core.WorkspaceLimitError(
            f"the {what} needs {_size(per_image)} of workspace for one image, more than the workspace "
            f"limit of {_size(limit)}; raise it with convnet.core.workspace_limit() or "
            f"set_workspace_limit(), or use smaller images")
    return max(1, min(n, limit // max(per_image, 1)))


def winograd_fits(g: Geometry) -> bool:
    """Whether the Winograd algorithm computes the layer ``g``: a 3x3 kernel, stride 1, dilation 1,
    no groups."""
    return g.kernel == (3, 3) and g.stride == (1, 1) and g.dilation == (1, 1) and g.groups == 1


def winograd_enabled() -> bool:
    """Whether ``algo="auto"`` may pick Winograd: numba imports and ``CONVNET_WINOGRAD`` is not "0"."""
    setting = os.environ.get(WINOGRAD_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{WINOGRAD_ENV} must be '0' (exact algorithms only) or '1', got {setting!r}")
    return setting != "0" and _winograd.available()


def plan(g: Geometry, backward: bool, algo: str = "auto", method: str = "auto", dx_algo: str = "auto",
         limit: int | None = None, table: Thresholds | None = None, winograd: bool | None = None) -> Plan:
    """Choose how to compute the layer ``g``: a pure function of its arguments.

    Parameters
    ----------
    g : the layer's canonical geometry
    backward : whether a backward pass follows this forward (the cached forward, and
        backward itself): the forward then also pays for what backward rebuilds
    algo, method, dx_algo : ``"auto"`` or a choice the caller has already checked;
        explicit choices are kept
    limit : workspace limit in bytes (default :func:`convnet.core.get_workspace_limit`)
    table : the thresholds (default :data:`THRESHOLDS`, read at each call; tests pass others)
    winograd : whether "auto" may choose Winograd (default :func:`winograd_enabled`, asked
        only for layers it fits, so other layers never import numba)
    """
    if winograd is None:
        winograd = winograd_fits(g) and winograd_enabled()
    return _plan(g, backward, algo, method, dx_algo, core.get_workspace_limit() if limit is None else limit,
                 THRESHOLDS if table is None else table, winograd)


def _winograd_wins(g: Geometry, table: Thresholds) -> bool:
    return (winograd_fits(g) and min(g.out_hw) >= table.winograd_min_size
            and min(g.c, g.f) >= table.winograd_min_channels
            and -(-g.out_hw[1] // 4) * g.n >= table.winograd_min_row_tiles)


@functools.lru_cache(maxsize=256)
def _plan(g: Geometry, backward: bool, algo: str, method: str, dx_algo: str, limit: int,
          table: Thresholds, winograd: bool) -> Plan:
    stride1 = g.stride == (1, 1)
    wins = winograd and _winograd_wins(g, table)
    if algo == "auto" and wins and _workspace(g, "winograd", "zero_insert", "winograd")[0] <= limit:
        algo = "winograd"
    if dx_algo == "auto" and method in ("auto", "zero_insert") and wins:
        if _workspace(g, "winograd", "zero_insert", "winograd")[1] <= limit:
            method, dx_algo = "zero_insert", "winograd"
    if dx_algo == "winograd":  # the flipped-filter correlation of the tutorial's route
        method = "zero_insert"
    auto_algo = algo == "auto" and g.groups == 1
    if g.groups > 1:
        # Grouped layers: the column-matrix algorithms batch the groups in one matmul over a
        # group axis; the per-tap GEMMs do not take groups.
        algo = "im2col" if algo == "auto" else algo
        dx_algo = "im2col" if dx_algo == "auto" else dx_algo
        method = "col2im" if method == "auto" else method
    if auto_algo:
        wide = g.c >= (table.cached_taps_min_channels if backward else table.taps_min_channels)
        algo = "taps" if stride1 and wide and _grid_waste(g.padded_hw, g.out_hw) <= table.max_taps_grid_waste \
            else "im2col"
    if method == "auto":
        # Zero insertion multiplies the input-gradient work by SH*SW (it correlates mostly
        # zeros), so strided layers take col2im; so do narrow layers and small maps, whose
        # padded map is much larger than the input.
        grid = (g.h + g.dilation[0] * (g.kh - 1), g.w + g.dilation[1] * (g.kw - 1))
        wide = min(g.c, g.f) >= table.zero_insert_min_channels
        small_waste = _grid_waste(grid, (g.h, g.w)) <= table.max_taps_grid_waste
        method = "zero_insert" if stride1 and wide and small_waste else "col2im"
    if dx_algo == "auto":
        if method == "zero_insert":  # a stride-1 correlation with F input channels
            dx_algo = "taps" if g.f >= table.taps_min_channels else "im2col"
        else:
            narrow = algo == "im2col" and stride1 and g.out_hw[1] <= table.chwn_max_width
            # On narrow maps col2im by im2col runs in CHWN, which beat the per-tap GEMMs.
            dx_algo = "taps" if g.c >= table.transposed_taps_min_channels and not narrow else "im2col"
    fwd, bwd = _workspace(g, algo, method, dx_algo)
    if auto_algo and fwd > limit and stride1:  # the other algorithm may fit one image
        other = "im2col" if algo == "taps" else "taps"
        if _workspace(g, other, method, dx_algo)[0] <= limit:
            algo, fwd = other, _workspace(g, other, method, dx_algo)[0]
    layout = _layout(g, backward, algo, method, dx_algo, table)
    fwd, bwd = _workspace(g, algo, method, dx_algo, layout)
    fwd_images = _images(g.n, fwd, limit, f"forward (algo={algo!r})")
    bwd_images = _images(g.n, bwd, limit, f"backward (method={method!r}, algo={dx_algo!r})") if backward else g.n
    return Plan(algo, method, dx_algo, fwd_images, bwd_images, layout)


def _layout(g: Geometry, backward: bool, algo: str, method: str, dx_algo: str, table: Thresholds) -> str:
    """CHWN for stride-1 im2col layers with narrow outputs, when the input gradient (if any)
    is computed by im2col too (col2im's transpose, or zero insertion's correlation of the
    padded map: at stride 1 that is padding only, so pads up to D*(K-1) keep it a pad)."""
    if algo != "im2col" or g.groups != 1 or g.stride != (1, 1) or g.out_hw[1] > table.chwn_max_width:
        return "cnhw"
    if backward and dx_algo != "im2col":
        return "cnhw"
    if backward and method == "zero_insert" and max(max(g.pads[0]) - g.dilation[0] * (g.kh - 1),
                                                   max(g.pads[1]) - g.dilation[1] * (g.kw - 1)) > 0:
        return "cnhw"
    return "chwn"


def unsupported(algo: str, g: Geometry, forward: bool = True, method: str = "auto") -> str | None:
    """Why ``algo`` cannot compute the layer ``g`` (for the caller's error), or None.

    ``forward`` False asks about the input gradient's algorithm (taps take any stride there),
    whose route is ``method``.
    """
    if algo == "taps" and g.groups > 1:
        return f"algo='taps' does not take groups > 1 (got groups={g.groups}); use 'auto' or 'im2col'"
    if algo == "taps" and forward and g.stride != (1, 1):
        return f"algo='taps' needs stride 1, got stride={g.stride}"
    if algo == "winograd":
        if not winograd_fits(g):
            return (f"algo='winograd' needs a 3x3 kernel, stride 1, dilation 1 and groups 1, got "
                    f"kernel={g.kernel}, stride={g.stride}, dilation={g.dilation}, groups={g.groups}")
        if method == "col2im":
            return "algo='winograd' computes the input gradient by method='zero_insert', got method='col2im'"
        if not _winograd.available():
            return f"algo='winograd' needs numba (pip install 'convnet[fast]'): {_winograd.status()}"
    return None


# --------------------------------------------------------------------------- the cache

class ConvCache(NamedTuple):
    """What a conv forward keeps for its backward, so backward does not rebuild it.

    ``algo`` is the forward's algorithm: for ``"im2col"``, ``data`` is the column matrix
    (KH*KW*C, N*OH*OW), its columns in the order of ``layout`` ((n, oh, ow) for "cnhw",
    (oh, ow, n) for "chwn"); for ``"winograd"`` the transformed tiles of the input; for
    ``"taps"`` the padded CNHW input (C, N, Hp, Wp). ``key`` holds the geometry and a
    fingerprint of the input's contents (see :func:`fingerprint`), so a cache from another
    input, or from this one edited in place since, is rejected.
    """

    algo: str
    data: np.ndarray
    key: tuple
    layout: str = "cnhw"


# Blocks of the fingerprint: a permutation of whole blocks (images swapped in the batch,
# say) changes it too, not only a changed value.
_FINGERPRINT_BLOCKS = 64


def fingerprint(x: np.ndarray) -> bytes:
    """A cheap digest of the contents of ``x``: wrapping 64-bit sums of its bytes, by block.

    One pass over ``x`` (about 0.2 ms for 8 MiB, under 1% of a CIFAR-sized layer's forward
    + backward). Any change of one value changes its block's sum; the block structure
    also catches blocks moved around. Equal contents give equal digests, so an equal copy
    of the input is accepted (its gradients are the same).
    """
    raw = np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    whole = raw.size // 8
    words = raw[:whole * 8].view(np.uint64)
    per_block = max(1, whole // _FINGERPRINT_BLOCKS)
    blocks = words[:whole // per_block * per_block].reshape(-1, per_block)
    sums = np.add.reduce(blocks, axis=1)  # uint64: wraps, which is what a digest wants
    rest = words[blocks.size:].sum(dtype=np.uint64)
    return sums.tobytes() + rest.tobytes() + raw[whole * 8:].tobytes()


def cache_key(x: np.ndarray, g: Geometry) -> tuple:
    return (g, fingerprint(x))


def cache_matches(cache: object, x: np.ndarray, g: Geometry) -> bool:
    """True when ``cache`` came from the cached forward of this ``x`` (same contents) and geometry."""
    return isinstance(cache, ConvCache) and cache.key == cache_key(x, g)


# --------------------------------------------------------------------------- forward

def _slices(n: int, step: int) -> list[slice]:
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _columns(x: np.ndarray, g: Geometry, reuse: str | None, layout: str = "cnhw") -> np.ndarray:
    """The column matrix of NCHW ``x`` in ``layout``. Strided CNHW layers read ``x`` directly
    (measured 3.1 vs 4.0 ms on the ResNet layer, and no padded copy in memory); at stride 1
    im2col of a padded CNHW copy was faster (4.0 vs 4.9 ms on the CIFAR layer)."""
    args = (g.kernel, g.stride, g.dilation, g.out_hw)
    if layout == "chwn":
        return core.im2col_chwn(core.nchw_to_chwn(x, g.pads, reuse=_Scratch.PADDED), *args, reuse=reuse)
    if g.stride != (1, 1):
        return core.im2col_nchw(x, g.pads, *args, reuse=reuse, groups=g.groups)
    return core.im2col(core.nchw_to_cnhw(x, g.pads, reuse=_Scratch.PADDED), *args, reuse=reuse, groups=g.groups)


def per_image_gemm(g: Geometry, table: Thresholds | None = None) -> bool:
    """Whether the CNHW forward's GEMM goes one image at a time straight into NCHW
    (``core.gemm_into_nchw(per_image=True)``): short kernels, or large maps."""
    table = THRESHOLDS if table is None else table
    return g.groups == 1 and (g.kh * g.kw * g.c <= table.per_image_gemm_max_k
                              or g.out_hw[0] * g.out_hw[1] >= table.per_image_gemm_min_outputs)


def _forward_im2col(x, wm, bias, g: Geometry, y, keep: bool, layout: str) -> np.ndarray:
    # Kept columns go to the cache and need their own memory; otherwise scratch.
    cols = _columns(x, g, reuse=None if keep else _Scratch.FWD_COLS, layout=layout)
    if layout == "chwn":
        core.gemm_chwn_into_nchw(wm, cols, y, bias, reuse=_Scratch.FWD_Y)
    else:
        core.gemm_into_nchw(wm, cols, y, bias, groups=g.groups, per_image=per_image_gemm(g))
    return cols


def _forward_taps(x, wm, bias, g: Geometry, y, keep: bool, layout: str) -> np.ndarray:
    xp = core.nchw_to_cnhw(x, g.pads, reuse=None if keep else _Scratch.PADDED)
    core.cnhw_to_nchw(core.correlate_taps(xp, wm, g.kernel, g.dilation, g.out_hw, reuse=_Scratch.FWD_Y),
                      y, bias)
    return xp


def _forward_winograd(x, wm, bias, g: Geometry, y, keep: bool, layout: str) -> np.ndarray | None:
    return _winograd.forward(x, _weight(wm, g), bias, _pads_before(g), y, keep)


def _weight(wm: np.ndarray, g: Geometry) -> np.ndarray:
    """The (F, C, KH, KW) weights of a kernel matrix (a view)."""
    return wm.reshape(g.f, g.kh, g.kw, g.c).transpose(0, 3, 1, 2)


def _pads_before(g: Geometry) -> Pair:
    return (g.pads[0][0], g.pads[1][0])


# One row per forward algorithm: (x chunk, kernel matrix, bias, geometry, output chunk, keep,
# layout) -> what a cache keeps (the column matrix for im2col, the transformed tiles of x for
# winograd, else the padded CNHW input).
_FORWARD = {"im2col": _forward_im2col, "taps": _forward_taps, "winograd": _forward_winograd}


def forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, g: Geometry, p: Plan,
            keep: bool) -> tuple[np.ndarray, ConvCache | None]:
    """``conv2d`` by plan ``p``; with ``keep``, also the cache for backward (None when the
    batch went in chunks)."""
    wm = core.kernel_matrix(weight)
    y = np.empty((g.n, g.f) + g.out_hw, dtype=g.dtype)
    run = _FORWARD[p.algo]
    slices = _slices(g.n, p.fwd_images)
    for sl in slices:
        data = run(x[sl], wm, bias, g, y[sl], keep, p.layout)
    if keep and len(slices) == 1:
        return y, ConvCache(p.algo, data, cache_key(x, g), p.layout)
    return y, None


# --------------------------------------------------------------------------- backward

def _dy_as(dy: np.ndarray, layout: str) -> np.ndarray:
    """A chunk of NCHW ``dy`` as the matrix (F, n*OH*OW) whose columns follow ``layout``."""
    if layout == "chwn":
        return core.as_matrix(core.nchw_to_chwn(dy, reuse=_Scratch.BWD_DY_CHWN))
    return core.as_matrix(core.nchw_to_cnhw(dy, reuse=_Scratch.BWD_DY))  # whole planes moved


# Ones vectors for row sums by GEMV, per dtype, the longest asked for so far (read-only).
_ONES: dict[np.dtype, np.ndarray] = {}


def _row_sums(m: np.ndarray) -> np.ndarray:
    """``m.sum(axis=1)`` of a matrix with contiguous rows, as one GEMV with a ones vector.

    The bias gradient from the matrix the filter gradient already made: LeNet's dy at batch
    32, 1 thread, 28 vs 125 us (16 x 25088) and 10 vs 78 us (32 x 3200) against
    ``dy.sum(axis=(0, 2, 3))`` on NCHW. The sums are in BLAS's order, not numpy's pairwise
    one: equal up to rounding.
    """
    n = m.shape[1]
    ones = _ONES.get(m.dtype)
    if ones is None or ones.size < n:
        ones = np.ones(max(n, 1024), dtype=m.dtype)
        ones.flags.writeable = False
        _ONES[m.dtype] = ones
    return m @ ones[:n]


def backward(dy: np.ndarray, x: np.ndarray, weight: np.ndarray, g: Geometry, p: Plan,
             cache: ConvCache | None, input_grad: bool, bias_grad: bool = True
             ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients of ``conv2d`` by plan ``p``; ``cache`` (checked by the caller) skips the
    column matrix's rebuild. The filter gradient follows the forward's algorithm and layout
    (the cache's, else the plan's): Winograd's reuses the forward's transformed tiles. The
    bias gradient (None without ``bias_grad``) sums the rows of ``dy`` as the filter
    gradient's matrix (see :func:`_row_sums`)."""
    wm = core.kernel_matrix(weight)
    groups = g.groups
    wino_dw = (cache.algo if cache is not None else p.algo) == "winograd"
    wino_dx = p.dx_algo == "winograd"
    dw_layout = "cnhw" if cache is not None and cache.algo == "taps" else (cache or p).layout
    # (G, KH*KW*C/G, F/G), per group cols @ dy.T (measured faster than dy @ cols.T)
    dwm_t = None if wino_dw else np.zeros((groups, wm.shape[1], g.f // groups), dtype=wm.dtype)
    dweight = np.zeros(weight.shape, dtype=g.dtype) if wino_dw else None
    dx = np.empty((g.n, g.c, g.h, g.w), dtype=g.dtype) if input_grad else None
    dbias = None
    for sl in [slice(0, g.n)] if cache is not None else _slices(g.n, p.bwd_images):
        if wino_dw:
            dweight += _winograd.weight_gradient(dy[sl], x[sl], weight, _pads_before(g),
                                                 None if cache is None else cache.data)
        if dx is not None and wino_dx:
            _winograd.input_gradient(dy[sl], weight, _pads_before(g), dx[sl])
        if wino_dw and (dx is None or wino_dx):
            continue
        dys = {}  # dy of this chunk in each layout asked for (both only when cache and plan differ)
        if not wino_dw:
            dys[dw_layout] = dy_m = _dy_as(dy[sl], dw_layout)
            if bias_grad:
                sums = _row_sums(dy_m)
                dbias = sums if dbias is None else np.add(dbias, sums, out=dbias)
            if cache is not None and cache.algo == "im2col":
                cols = cache.data
            elif cache is not None:
                # The filter gradient is one GEMM on the column matrix even after a taps forward:
                # per-tap GEMMs with an (N*Hp*Wp)-long reduction ran 2x slower.
                cols = core.im2col(cache.data, g.kernel, g.stride, g.dilation, g.out_hw, reuse=_Scratch.BWD_COLS,
                                   groups=groups)
            else:
                cols = _columns(x[sl], g, reuse=_Scratch.BWD_COLS, layout=dw_layout)
            core.stacked_gemm(core.as_groups(cols, groups), core.as_groups(dy_m, groups).transpose(0, 2, 1),
                              dwm_t, beta=1.0)
            del cols  # free the column matrix before the input gradient builds its own
        if dx is not None and not wino_dx:
            _input_grad_into(dy[sl], dys.get(p.layout), weight, wm, g, p, dx[sl])
    if not wino_dw:
        dweight = dwm_t.reshape(groups, g.kh, g.kw, g.c // groups, g.f // groups).transpose(0, 4, 3, 1, 2)
        dweight = np.ascontiguousarray(dweight).reshape(weight.shape)
    if bias_grad and dbias is None:  # Winograd's filter gradient made no dy matrix
        dbias = dy.sum(axis=(0, 2, 3))
    return dx, dweight, dbias


def input_grad(dy: np.ndarray, weight: np.ndarray, g: Geometry, p: Plan) -> np.ndarray:
    """The input gradient of ``conv2d`` alone, NCHW (N, C, H, W): ``conv_transpose2d``'s forward.

    The same code as :func:`backward`'s input gradient (:func:`_input_grad_into`): the
    tutorial's zero insertion, padding and flipped filters, or its col2im transpose.
    """
    wm = core.kernel_matrix(weight)
    dx = np.empty((g.n, g.c, g.h, g.w), dtype=g.dtype)
    for sl in _slices(g.n, p.bwd_images):
        if p.dx_algo == "winograd":
            _winograd.input_gradient(dy[sl], weight, _pads_before(g), dx[sl])
        else:
            _input_grad_into(dy[sl], None, weight, wm, g, p, dx[sl])
    return dx


def _input_grad_into(dy: np.ndarray, dy_m: np.ndarray | None, weight: np.ndarray, wm: np.ndarray, g: Geometry,
                     p: Plan, out: np.ndarray) -> None:
    """Write the input gradient of one chunk into ``out`` (n, C, H, W), by the plan's route,
    algorithm and layout. ``dy`` is the chunk's NCHW dy; ``dy_m``, if given, the same as a
    matrix in the plan's layout (the filter gradient's, reused)."""
    (pt, _), (pl, _) = g.pads
    n = out.shape[0]
    if p.layout == "chwn" and p.method == "zero_insert":  # by im2col at stride 1 (the plan's rule)
        y = core.row_buffer((g.c, g.h, g.w, n), g.dtype, reuse=_Scratch.CORR_Y)
        z = core.nchw_to_chwn(dy, _zero_insert_pads(g), reuse=_Scratch.BWD_Z)
        cols = core.im2col_chwn(z, g.kernel, (1, 1), g.dilation, (g.h, g.w), reuse=_Scratch.CORR_COLS)
        _blas.gemm(core.flipped_kernel_matrix(weight), cols, core.as_matrix(y), beta=0.0)
        out[...] = y.transpose(3, 0, 1, 2)
        return
    if dy_m is None:
        dy_m = _dy_as(dy, p.layout)
    if p.layout == "chwn":  # col2im by im2col
        dcols = core.row_buffer((g.kh * g.kw * g.c,) + g.out_hw + (n,), wm.dtype, reuse=_Scratch.BWD_DCOLS)
        _blas.gemm(wm.T, dy_m, core.as_matrix(dcols), beta=0.0)
        dxp = core.col2im_chwn(core.as_matrix(dcols), (g.c,) + g.padded_hw + (n,), g.kernel, g.stride,
                               g.dilation, g.out_hw, reuse=_Scratch.BWD_DXP)
        out[...] = dxp[:, pt:pt + g.h, pl:pl + g.w].transpose(3, 0, 1, 2)
        return
    dy_cnhw = dy_m.reshape((g.f, out.shape[0]) + g.out_hw)
    if p.method == "col2im":
        dx = _dx_col2im(dy_cnhw, wm, g, p.dx_algo)
    else:
        dx = _dx_zero_insert(dy_cnhw, weight, g, p.dx_algo)
    out[...] = dx.transpose(1, 0, 2, 3)


def _dx_col2im(dy_cnhw: np.ndarray, wm: np.ndarray, g: Geometry, algo: str) -> np.ndarray:
    """Input gradient as ``col2im(W.T @ dy)``; returns a CNHW view (C, n, H, W).

    ``algo="taps"`` computes the same sums by per-tap GEMMs, without the column matrix.
    """
    (pt, _), (pl, _) = g.pads
    n = dy_cnhw.shape[1]
    if algo == "taps":
        dxp = core.transposed_taps(dy_cnhw, wm, g.padded_hw, g.kernel, g.stride, g.dilation,
                                   reuse=_Scratch.BWD_TAPS)
    else:
        groups = g.groups
        dcols = core.as_matrix(core.row_buffer((g.kh * g.kw * g.c,) + dy_cnhw.shape[1:], wm.dtype,
                                               reuse=_Scratch.BWD_DCOLS))
        core.stacked_gemm(core.as_groups(wm, groups).transpose(0, 2, 1),
                          core.as_groups(core.as_matrix(dy_cnhw), groups), core.as_groups(dcols, groups))
        dxp = core.col2im(dcols, (g.c, n) + g.padded_hw, g.kernel, g.stride, g.dilation, g.out_hw,
                          reuse=_Scratch.BWD_DXP, groups=groups)
    return dxp[:, :, pt:pt + g.h, pl:pl + g.w]


def _zero_insert_pads(g: Geometry) -> Pads:
    """Pads of the stride-expanded dy before the flipped-filter correlation (negative = crop):
    ``D*(K-1) - P_before`` in front, and behind whatever makes its length ``H + D*(K-1)``."""
    (oh, ow), (sh, sw) = g.out_hw, g.stride
    (pt, _), (pl, _) = g.pads
    ext = (g.dilation[0] * (g.kh - 1), g.dilation[1] * (g.kw - 1))
    return ((ext[0] - pt, g.h + pt - (oh - 1) * sh - 1), (ext[1] - pl, g.w + pl - (ow - 1) * sw - 1))


def _dx_zero_insert(dy_cnhw: np.ndarray, weight: np.ndarray, g: Geometry, algo: str) -> np.ndarray:
    """Input gradient the tutorial's way; returns a CNHW array (C, n, H, W) or view.

    The stride-expanded map is padded by ``D*(K-1) - P_before`` in front and by whatever
    makes its length ``H + D*(K-1)`` behind (negative = crop, for ``P > D*(K-1)`` or
    rows no window reached), so a stride-1 correlation with the flipped filters has
    exactly ``H`` outputs. With groups, that correlation is grouped the same way.
    """
    z = core.zero_insert(dy_cnhw, g.stride, _zero_insert_pads(g), reuse=_Scratch.BWD_Z)
    wm = core.flipped_kernel_matrix(weight, g.groups)
    hw = (g.h, g.w)
    if algo == "taps":
        return core.correlate_taps(z, wm, g.kernel, g.dilation, hw, reuse=_Scratch.CORR_Y)
    cols = core.im2col(z, g.kernel, (1, 1), g.dilation, hw, reuse=_Scratch.CORR_COLS, groups=g.groups)
    y = core.row_buffer((g.c, z.shape[1]) + hw, g.dtype, reuse=_Scratch.CORR_Y)
    core.stacked_gemm(core.as_groups(wm, g.groups), core.as_groups(cols, g.groups),
                      core.as_groups(core.as_matrix(y), g.groups))
    return y
