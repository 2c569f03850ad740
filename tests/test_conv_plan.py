"""The conv plan: what it chooses for the benchmark layers, pinned, and that it is pure.

Tuning a threshold in ``convnet._conv.THRESHOLDS`` must not silently move one of these
layers onto another path: if a change is meant, measure it (benchmarks/bench.py) and
update this table with the figures.
"""

import numpy as np
import pytest

from convnet import _conv, core
from convnet._args import output_size

MIB = 2**20


def geometry(n, c, h, w, f, k, s, p, dtype=np.float32):
    pads = ((p, p), (p, p))
    out_hw = (output_size(h, k, s, pads[0]), output_size(w, k, s, pads[1]))
    return _conv.Geometry(n, c, h, w, f, k, k, (s, s), pads, (1, 1), out_hw, np.dtype(dtype))


# The suite of benchmarks/bench.py: (N, C, H, W, F, K, S, P).
BENCH = {
    "lenet-c1": (64, 1, 28, 28, 6, 5, 1, 2),
    "lenet-c2": (64, 6, 14, 14, 16, 5, 1, 0),
    "cifar": (64, 32, 32, 32, 64, 3, 1, 1),
    "vgg": (16, 64, 56, 56, 64, 3, 1, 1),
    "resnet-s2": (32, 128, 28, 28, 128, 3, 2, 1),
}

# layer: (conv2d's algo, the cached forward's algo, backward's method, backward's dx_algo),
# by the exact algorithms (without numba, or CONVNET_WINOGRAD=0)
PINNED = {
    "lenet-c1": ("im2col", "im2col", "col2im", "im2col"),
    "lenet-c2": ("im2col", "im2col", "col2im", "im2col"),
    "cifar": ("taps", "taps", "zero_insert", "taps"),
    "vgg": ("taps", "taps", "zero_insert", "taps"),
    "resnet-s2": ("im2col", "im2col", "col2im", "taps"),
}


# ... and where Winograd may be used (numba installed): the two wide 3x3 stride-1 layers
# (cifar fwd + bwd 0.41x, vgg 0.38x the exact plan; see THRESHOLDS).
PINNED_WINOGRAD = dict(PINNED, cifar=("winograd", "winograd", "zero_insert", "winograd"),
                       vgg=("winograd", "winograd", "zero_insert", "winograd"))


@pytest.mark.parametrize("winograd", [False, True])
@pytest.mark.parametrize("name", sorted(BENCH))
def test_plan_of_the_benchmark_layers(name, winograd):
    g = geometry(*BENCH[name])
    fwd = _conv.plan(g, backward=False, limit=256 * MIB, winograd=winograd)
    bwd = _conv.plan(g, backward=True, limit=256 * MIB, winograd=winograd)
    assert (fwd.algo, bwd.algo, bwd.method, bwd.dx_algo) == (PINNED_WINOGRAD if winograd else PINNED)[name]
    # Under the default limit every benchmark batch goes in one piece (so the cache is kept).
    assert fwd.fwd_images == bwd.fwd_images == bwd.bwd_images == g.n


# The layout of the cached forward's plan: the batch goes innermost (CHWN) for stride-1 im2col
# layers with narrow outputs (see THRESHOLDS.chwn_max_width); "lenet-default-c2" is the second
# conv of convnet.lenet() at its training batch (16 -> 32 channels, 14x14 -> 10x10).
PINNED_LAYOUT = {"lenet-c1": "cnhw", "lenet-c2": "chwn", "cifar": "cnhw", "vgg": "cnhw", "resnet-s2": "cnhw",
                 "lenet-default-c2": "chwn"}


@pytest.mark.parametrize("name", sorted(PINNED_LAYOUT))
def test_plan_layout_of_the_benchmark_layers(name):
    g = geometry(*BENCH.get(name, (32, 16, 14, 14, 32, 5, 1, 0)))
    assert _conv.plan(g, backward=True, limit=256 * MIB, winograd=False).layout == PINNED_LAYOUT[name]


def test_plan_of_the_resnet_8x8_layer():
    """ResNet-20's last stage (N=128, C=F=64, 8x8): col2im by im2col in CHWN, not per-tap GEMMs."""
    p = _conv.plan(geometry(128, 64, 8, 8, 64, 3, 1, 1), backward=True, limit=256 * MIB, winograd=False)
    assert (p.algo, p.method, p.dx_algo, p.layout) == ("im2col", "col2im", "im2col", "chwn")


def test_plan_takes_chwn_only_where_one_layout_serves_the_layer():
    g = geometry(32, 16, 14, 14, 32, 5, 1, 0)
    assert _conv.plan(g, backward=False, algo="im2col", limit=256 * MIB).layout == "chwn"
    # Zero insertion at stride 1 is a pad, so its correlation by im2col takes CHWN too ...
    assert _conv.plan(g, backward=True, method="zero_insert", dx_algo="im2col", limit=256 * MIB).layout == "chwn"
    padded = geometry(32, 16, 14, 14, 32, 3, 1, 3)  # ... unless it crops (pads above K-1)
    assert _conv.plan(padded, backward=True, method="zero_insert", dx_algo="im2col", limit=256 * MIB).layout == "cnhw"
    # Per-tap GEMMs, a stride, groups or wider outputs keep CNHW.
    assert _conv.plan(g, backward=True, method="zero_insert", dx_algo="taps", limit=256 * MIB).layout == "cnhw"
    assert _conv.plan(g, backward=True, algo="taps", limit=256 * MIB).layout == "cnhw"
    assert _conv.plan(geometry(32, 16, 14, 14, 32, 5, 2, 0), backward=True, limit=256 * MIB).layout == "cnhw"
    assert _conv.plan(g._replace(groups=16), backward=True, limit=256 * MIB).layout == "cnhw"
    wide = geometry(32, 16, 21, 21, 32, 5, 1, 0)  # 17x17 outputs
    assert _conv.plan(wide, backward=True, limit=256 * MIB).layout == "cnhw"
    narrower = _conv.THRESHOLDS._replace(chwn_max_width=9)
    assert _conv.plan(g, backward=True, limit=256 * MIB, table=narrower).layout == "cnhw"


@pytest.mark.parametrize("shape, per_image", [
    (BENCH["lenet-c1"], True),                # K=25: the transpose is a large part
    ((32, 1, 28, 28, 16, 5, 1, 2), True),     # convnet.lenet()'s first conv
    ((32, 32, 64, 64, 32, 3, 2, 1), True),    # 1024 outputs an image: large GEMMs
    (BENCH["resnet-s2"], False),              # K=1152 over 14x14: one big GEMM threads better
    ((128, 16, 32, 32, 32, 3, 2, 1), False),  # ResNet-20's first downsampling, K=144 over 16x16
])
def test_forward_gemm_per_image_follows_its_table_rows(shape, per_image):
    g = geometry(*shape)
    assert _conv.per_image_gemm(g) is per_image
    if g.c > 1:  # grouped layers: one GEMM per group
        assert _conv.per_image_gemm(g._replace(groups=g.c)) is False
    k, outputs = g.kh * g.kw * g.c, g.out_hw[0] * g.out_hw[1]
    lower = _conv.THRESHOLDS._replace(per_image_gemm_max_k=k - 1, per_image_gemm_min_outputs=outputs + 1)
    assert _conv.per_image_gemm(g, lower) is False  # each row decides: below both, never per image


def test_plan_routes_grouped_layers_to_the_column_matrix():
    """The benchmark's depthwise layer (groups=C): taps do not take groups."""
    n, c, h, w, f, k, s, p = 32, 64, 32, 32, 64, 3, 1, 1
    g = geometry(n, c, h, w, f, k, s, p)._replace(groups=64)
    for backward in (False, True):
        assert _conv.plan(g, backward=backward, limit=256 * MIB)[:3] == ("im2col", "col2im", "im2col")
    assert _conv.plan(g, backward=True, method="zero_insert", limit=256 * MIB).dx_algo == "im2col"
    assert "groups" in _conv.unsupported("taps", g)


def test_plan_keeps_explicit_choices():
    g = geometry(*BENCH["cifar"])
    p = _conv.plan(g, backward=True, algo="im2col", method="col2im", dx_algo="im2col", limit=256 * MIB)
    assert p[:3] == ("im2col", "col2im", "im2col")
    # An explicit route still gets its own default algorithm.
    assert _conv.plan(g, backward=True, method="col2im", limit=256 * MIB).dx_algo == "taps"


def test_plan_chunks_follow_the_workspace_limit():
    g = geometry(*BENCH["resnet-s2"])
    cols = 14 * 14 * 9 * 128 * 4  # the forward's column matrix, per image
    # col2im by taps: dy on its grid and two padded (C, 30, 30) sums per image
    taps = (128 * 14 * 14 + 2 * 128 * 30 * 30) * 4
    p = _conv.plan(g, backward=True, limit=5 * cols)
    assert p.fwd_images == 5 and p.bwd_images == 5 * cols // taps == 4
    assert _conv.plan(g, backward=True, limit=taps).bwd_images == 1
    assert _conv.plan(g, backward=False, limit=cols).fwd_images == 1


def test_plan_refuses_one_image_over_the_limit():
    g = geometry(*BENCH["resnet-s2"])
    message = r"forward \(algo='im2col'\) needs 882 KiB .* limit of 1000 bytes"
    with pytest.raises(core.WorkspaceLimitError, match=message):
        _conv.plan(g, backward=False, limit=1000)
    with pytest.raises(core.WorkspaceLimitError, match=r"backward \(method='col2im', algo='taps'\)"):
        _conv.plan(g, backward=True, limit=14 * 14 * 9 * 128 * 4)


def test_plan_falls_back_to_the_algorithm_that_fits():
    g = geometry(1, 64, 64, 64, 64, 3, 1, 1)  # taps: (64 + 64) * 66 * 66 * 4 = 2.1 MiB per image
    assert _conv.plan(g, backward=False, limit=4 * MIB, winograd=False).algo == "taps"
    cols = 64 * 64 * 9 * 64 * 4  # 9 MiB
    assert cols > 4 * MIB
    assert _conv.plan(g, backward=False, algo="auto", limit=cols, winograd=False).algo == "taps"
    narrow = geometry(1, 2, 64, 64, 2, 3, 1, 1)  # im2col by default, taps fit better
    taps = (2 + 2) * 66 * 66 * 4
    assert _conv.plan(narrow, backward=False, limit=MIB, winograd=False).algo == "im2col"
    assert _conv.plan(narrow, backward=False, limit=taps, winograd=False).algo == "taps"
    # Winograd's tiles of x and y: 36 * (64 + 64) * 16 * 16 * 4 = 4.5 MiB per image (two images:
    # tile rows long enough for the table)
    pair = g._replace(n=2)
    assert _conv.plan(pair, backward=False, limit=5 * MIB, winograd=True).algo == "winograd"
    assert _conv.plan(pair, backward=False, limit=4 * MIB, winograd=True).algo == "taps"


def test_plan_moves_with_a_threshold_and_is_pure():
    g = geometry(64, 6, 16, 16, 16, 3, 1, 1)  # 6 channels, 3x3 pad 1: taps forward only
    assert _conv.plan(g, backward=False, limit=MIB).algo == "taps"
    higher = _conv.THRESHOLDS._replace(taps_min_channels=7)
    assert _conv.plan(g, backward=False, limit=MIB, table=higher).algo == "im2col"
    assert _conv.plan(g, backward=False, limit=MIB) == _conv.plan(g, backward=False, limit=MIB)


def test_plan_reads_the_current_workspace_limit():
    g = geometry(*BENCH["vgg"])
    with core.workspace_limit(8 * MIB):
        assert _conv.plan(g, backward=True, winograd=False)[3:5] == (4, 1)  # taps: 1.6 MiB, cols 7.1 MiB per image
    assert _conv.plan(g, backward=True, winograd=False).fwd_images == g.n


def test_forward_algorithms_and_plan_choices_have_executors():
    assert set(_conv.ALGOS) == set(_conv._FORWARD)
    assert set(_conv.METHODS) == {"zero_insert", "col2im"}


@pytest.mark.parametrize("shape, chosen", [
    ((128, 8, 8, 8, 8, 3, 1, 1), True),      # the table's corner: 8x8 outputs, 8 channels
    ((8, 32, 16, 16, 32, 3, 1, 1), True),    # ... and 4 tiles per row * 8 images = 32
    ((128, 16, 4, 4, 16, 3, 1, 1), False),   # smaller maps lose
    ((4, 32, 16, 16, 32, 3, 1, 1), False),   # ... and so do short tile rows (a small batch)
    ((128, 4, 32, 32, 64, 3, 1, 1), False),  # few input channels: the transforms cost more
    ((128, 64, 32, 32, 4, 3, 1, 1), False),  # ... or few filters
    ((64, 64, 32, 32, 64, 5, 1, 2), False),  # Winograd F(4x4, 3x3) is for 3x3 kernels only
    ((64, 64, 32, 32, 64, 3, 2, 1), False),  # and stride 1
])
def test_winograd_follows_its_table_row(shape, chosen):
    g = geometry(*shape)
    p = _conv.plan(g, backward=True, limit=256 * MIB, winograd=True)
    assert (p.algo == "winograd", p.dx_algo == "winograd") == (chosen, chosen)
    assert p[:3] == _conv.plan(g, backward=True, limit=256 * MIB, winograd=False)[:3] or chosen
    if chosen:  # a layer on the table's corner leaves Winograd when that row is raised by one
        values = {"winograd_min_size": min(g.out_hw), "winograd_min_channels": min(g.c, g.f),
                  "winograd_min_row_tiles": -(-g.out_hw[1] // 4) * g.n}
        at = [row for row, value in values.items() if value == getattr(_conv.THRESHOLDS, row)]
        assert at
        for row in at:
            higher = _conv.THRESHOLDS._replace(**{row: values[row] + 1})
            assert _conv.plan(g, backward=True, limit=256 * MIB, winograd=True, table=higher).algo != "winograd"


def test_dilated_layers_never_take_winograd():
    pads = ((2, 2), (2, 2))
    g = _conv.Geometry(8, 32, 32, 32, 32, 3, 3, (1, 1), pads, (2, 2), (32, 32), np.dtype(np.float32))
    p = _conv.plan(g, backward=True, limit=256 * MIB, winograd=True)
    assert "winograd" not in (p.algo, p.dx_algo)
    assert "dilation" in _conv.unsupported("winograd", g)


def test_explicit_winograd_input_gradient_takes_the_zero_insertion_route():
    g = geometry(*BENCH["lenet-c2"][:5], 3, 1, 1)
    p = _conv.plan(g, backward=True, dx_algo="winograd", limit=256 * MIB, winograd=False)
    assert (p.method, p.dx_algo) == ("zero_insert", "winograd")
    assert "method='zero_insert'" in _conv.unsupported("winograd", g, method="col2im")


@pytest.mark.parametrize("setting, expected", [("0", False), ("1", None), ("", None)])
def test_environment_switch(monkeypatch, setting, expected):
    """CONVNET_WINOGRAD=0 keeps "auto" exact; otherwise Winograd is used where numba imports."""
    from convnet import _winograd
    monkeypatch.setenv(_conv.WINOGRAD_ENV, setting)
    assert _conv.winograd_enabled() is (_winograd.available() if expected is None else expected)
    cifar = geometry(*BENCH["cifar"])
    want = "winograd" if _conv.winograd_enabled() else "taps"
    assert _conv.plan(cifar, backward=True, limit=256 * MIB).algo == want


def test_environment_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv(_conv.WINOGRAD_ENV, "yes")
    with pytest.raises(ValueError, match=r"CONVNET_WINOGRAD must be '0' .* got 'yes'"):
        _conv.winograd_enabled()
