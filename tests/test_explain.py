"""The terminal replay of the tutorial's worked examples (convnet.explain)."""

from __future__ import annotations

import io

import numpy as np
import pytest

import convnet.reference as R
from convnet import explain as E


def run(*args, **kwargs) -> tuple[str, int]:
    buf = io.StringIO()
    n = E.explain(*args, file=buf, **kwargs)
    return buf.getvalue(), n


def squash(text: str) -> str:
    """Drop all whitespace, so aligned multi-line arrays compare as one-line lists."""
    return "".join(text.split())


def test_format_array_integers_aligned_and_floats_trimmed():
    assert E.format_array(np.array([[6., 7, 5], [3, -1, -1], [2, -1, 4]])) == (
        "[[ 6,  7,  5],\n [ 3, -1, -1],\n [ 2, -1,  4]]")
    assert E.format_array(np.array([3.25, 2.0, -0.5])) == "[3.25,    2, -0.5]"
    assert E.format_array(np.array([1 / 3])) == "[0.3333]"
    with pytest.raises(ValueError, match="1-D or 2-D"):
        E.format_array(np.zeros((2, 2, 2)))


def test_conv_part_shows_formula_element_and_both_feature_maps():
    text, mismatches = run("conv")
    assert mismatches == 0
    assert "(5 - 3 + 2*1)/2 + 1 = 4/2 + 1 = 3" in text
    # The written-out element: sum of products per channel, then plus the bias.
    assert "channel 0: 0*(-1) + 0*1 + 0*0 + 0*0 + 0*1 + 1*0 + 0*0 + 2*1 + 2*1 = 4" in text
    assert "a[0][0, 0] = 4 + 0 + 1 + 1 (bias) = 6" in text
    flat = squash(text)
    assert "featuremap0:[[6,7,5],[3,-1,-1],[2,-1,4]]" in flat
    assert "featuremap1:[[2,-5,-8],[1,-4,-4],[0,-5,-5]]" in flat
    assert "engine == loop reference" in text
    assert "MISMATCH" not in text


def test_feature_maps_printed_exactly_in_the_documented_layout():
    text, _ = run("conv")
    assert "feature map 0:\n  [[ 6,  7,  5],\n   [ 3, -1, -1],\n   [ 2, -1,  4]]" in text
    assert "feature map 1:\n  [[ 2, -5, -8],\n   [ 1, -4, -4],\n   [ 0, -5, -5]]" in text


def test_backward_part_steps_match_the_engine():
    text, mismatches = run("backward")
    assert mismatches == 0
    flat = squash(text)
    # Given map, its zero insertion for stride 2, then one ring of padding (K - 1 - P = 1).
    assert "dy,map0:[[1,0,-1],[0,2,0],[-1,0,1]]" in flat
    assert "zero-inserteddy,map0:[[1,0,0,0,-1],[0,0,0,0,0],[0,0,2,0,0],[0,0,0,0,0],[-1,0,0,0,1]]" in flat
    assert "paddeddy,map0:[[0,0,0,0,0,0,0],[0,1,0,0,0,-1,0]," in flat
    assert "flippedW0,channel0:[[1,1,0],[0,1,0],[0,1,-1]]" in flat
    # Input sensitivity map and filter gradients as the loop reference computes them.
    x = E.EXAMPLE_INPUT[None]
    dx, dw, db = R.conv2d_backward(E.EXAMPLE_DY[None], x, E.EXAMPLE_WEIGHT, stride=2, padding=1)
    assert "inputsensitivitymapdx,channel0:" + squash(E.format_array(dx[0, 0])) in flat
    assert "dW1,channel2:" + squash(E.format_array(dw[1, 2])) in flat
    assert "db=[2,3]" in flat and np.array_equal(db, [2, 3])
    assert text.count("check:") >= 6 and "MISMATCH" not in text


def test_pool_part_shows_pooled_values_routing_and_kronecker_form():
    text, mismatches = run("pool")
    assert mismatches == 0
    flat = squash(text)
    assert "maxpooled,channel0:[[6,8],[3,4]]" in flat
    assert "maxpooled,channel1:[[5,7],[9,6]]" in flat
    assert "channel 1 window (1, 0) [8, 9, 3, 4]: max 9 at input (2, 1) receives 7" in text
    assert "dx,channel0:[[0,0,0,0],[0,1,0,2],[3,0,0,0],[0,0,0,4]]" in flat
    assert "meanpooled,channel0:[[3.25,5.25],[2,2]]" in flat
    assert "kron(dy, ones(2, 2)) / 4" in text
    assert "dx,channel1:[[1.25,1.25,1.5,1.5],[1.25,1.25,1.5,1.5],[1.75,1.75,2,2],[1.75,1.75,2,2]]" in flat


def test_all_parts_by_default():
    text, mismatches = run()
    assert mismatches == 0
    for heading in ("Convolution forward", "Convolution backward", "Pooling: 2x2 windows, stride 2"):
        assert heading in text


def test_a_wrong_engine_result_is_reported_loudly(monkeypatch):
    real = R.conv2d
    monkeypatch.setattr(R, "conv2d", lambda *a, **k: real(*a, **k) + 1.0)
    text, mismatches = run("conv")
    assert mismatches == 1
    assert "!!! MISMATCH: feature maps: engine and loop reference disagree, max |difference| 1" in text
    assert "1 MISMATCH(ES)" in text


def test_user_arrays_with_non_dividing_stride_and_large_padding_agree():
    x = (np.arange(36.0).reshape(1, 6, 6) % 7) - 3
    w = np.array([[[[1, 0, -1], [2, 0, -2], [1, 0, -1]]], [[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]], float)
    text, mismatches = run(["conv", "backward"], x=x, weight=w, stride=2, padding=0)
    assert mismatches == 0
    assert "floor((6 - 3 + 2*0)/2) + 1 = floor(3/2) + 1 = 2" in text
    assert "extra row(s)/column(s)" in text
    y = R.conv2d(x[None], w, stride=2, padding=0)
    assert "featuremap1:" + squash(E.format_array(y[0, 1])) in squash(text)
    # Padding larger than K - 1 crops the zero-inserted map instead of padding it.
    text, mismatches = run("backward", x=np.ones((3, 3)), weight=np.full((1, 1, 2, 2), 0.5),
                           stride=(1, 2), padding=(3, 2))
    assert mismatches == 0 and "crop instead of pad" in text


def test_user_weights_default_to_stride_1_padding_0_and_zero_bias():
    text, _ = run("conv", weight=np.ones((1, 3, 2, 2)))
    assert "stride 1; zero padding 0" in text and "bias b0 = 0" in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.zeros((1, 5, 5))), r"input has 1 channel\(s\).*filters expect 3"),
    (dict(weight=np.zeros((2, 3, 7, 7))), "kernel height 7 is larger than the padded input height 5"),
    (dict(x=np.zeros((2, 3, 5, 5))), "must hold one image"),
    (dict(x=np.zeros(5)), r"shape \(H, W\), \(C, H, W\) or \(1, C, H, W\)"),
    (dict(x=np.zeros((3, 40, 40))), "too large to print"),
    (dict(x=np.full((3, 5, 5), np.nan)), "must be finite"),
    (dict(weight=np.zeros((2, 3, 3))[None, None]), r"weight must have shape \(F, C, KH, KW\)"),
    (dict(weight=np.zeros((2, 3, 3, 3)), bias=np.zeros(3)), r"bias must have shape \(2,\)"),
    (dict(weight=np.zeros((2, 3, 3, 3)), stride=0), "stride must be >= 1"),
    (dict(weight=np.zeros((2, 3, 3, 3)), padding=-1), "padding must be >= 0"),
    (dict(weight=np.zeros((2, 3, 3, 3)), stride=1.5), "stride must be an int"),
    (dict(part="deconv"), "part must be"),
])
def test_bad_user_arrays_raise_before_printing(kwargs, match):
    buf = io.StringIO()
    with pytest.raises(ValueError, match=match):
        E.explain(file=buf, **kwargs)
    assert buf.getvalue() == ""


def test_non_numeric_input_is_a_type_error():
    with pytest.raises(TypeError, match="real numbers"):
        E.explain(x=np.array([["a", "b"], ["c", "d"]]), file=io.StringIO())


def test_pool_needs_at_least_2x2_and_handles_odd_sizes():
    with pytest.raises(ValueError, match="at least 2x2"):
        E.explain("pool", x=np.ones((1, 5)), file=io.StringIO())
    text, mismatches = run("pool", x=np.arange(25.0).reshape(5, 5))
    assert mismatches == 0 and "is odd" in text
    assert "maxpooled,channel0:[[6,8],[16,18]]" in squash(text)


def test_load_input_and_weights_files(tmp_path):
    np.save(tmp_path / "x.npy", E.EXAMPLE_INPUT.astype(np.int64))
    np.savez(tmp_path / "w.npz", weight=E.EXAMPLE_WEIGHT, bias=E.EXAMPLE_BIAS, stride=2, padding=1)
    x = E.load_input(str(tmp_path / "x.npy"))
    w = E.load_weights(str(tmp_path / "w.npz"))
    assert x.shape == (1, 3, 5, 5) and x.dtype == np.float64
    text, mismatches = run("conv", x=x, **w)
    assert mismatches == 0 and "featuremap1:[[2,-5,-8],[1,-4,-4],[0,-5,-5]]" in squash(text)


def test_bad_files_are_rejected_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found"):
        E.load_input(str(tmp_path / "missing.npy"))
    np.savez(tmp_path / "nokey.npz", kernel=np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['kernel'\]"):
        E.load_weights(str(tmp_path / "nokey.npz"))
    np.savez(tmp_path / "empty.npz", bias=np.ones(1))
    with pytest.raises(ValueError, match="has no 'weight' array"):
        E.load_weights(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "badstride.npz", weight=np.ones((1, 1, 2, 2)), stride=0)
    with pytest.raises(ValueError, match="stride in .* must be >= 1"):
        E.load_weights(str(tmp_path / "badstride.npz"))
    np.save(tmp_path / "w.npy", np.ones((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="must be an .npz archive"):
        E.load_weights(str(tmp_path / "w.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="cannot read input file"):
        E.load_input(str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 2)))
    with pytest.raises(ValueError, match="not an .npz archive"):
        E.load_input(str(tmp_path / "x.npz"))


# --------------------------------------------------------------------------- the command line

def cli(capsys, *argv: str) -> tuple[int, str, str]:
    from convnet.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_explain_parts(capsys):
    code, out, err = cli(capsys, "explain")
    assert code == 0 and err == ""
    flat = squash(out)
    assert "[[6,7,5],[3,-1,-1],[2,-1,4]]" in flat and "[[2,-5,-8],[1,-4,-4],[0,-5,-5]]" in flat
    assert "[[6,8],[3,4]]" in flat and "[[5,7],[9,6]]" in flat
    code, out, _ = cli(capsys, "explain", "pool")
    assert code == 0 and "Convolution" not in out and "[[5,7],[9,6]]" in squash(out)


def test_cli_explain_user_files(capsys, tmp_path):
    np.save(tmp_path / "x.npy", np.arange(36.0).reshape(6, 6) % 5)
    np.savez(tmp_path / "w.npz", weight=np.array([[[[1.0, 0], [0, -1]]]]), stride=2)
    code, out, _ = cli(capsys, "explain", "conv", "--input", str(tmp_path / "x.npy"),
                       "--weights", str(tmp_path / "w.npz"))
    assert code == 0
    assert "height: (6 - 2 + 2*0)/2 + 1 = 4/2 + 1 = 3" in out
    assert "featuremap0:[[-2,-2,3],[-2,3,-2],[3,-2,3]]" in squash(out)


@pytest.mark.parametrize("argv, message", [
    (["explain", "--input", "{d}/x.npy"], "input has 1 channel(s) (shape (1, 6, 6)) but the filters expect 3"),
    (["explain", "--input", "{d}/missing.npy"], "input file not found"),
    (["explain", "--weights", "{d}/bad.npz"], "unknown key(s) ['kernel']"),
    (["explain", "conv", "--weights", "{d}/big.npz"], "kernel height 9 is larger than the padded input height 7"),
])
def test_cli_explain_bad_files_one_line_nonzero(capsys, tmp_path, argv, message):
    np.save(tmp_path / "x.npy", np.ones((6, 6)))
    np.savez(tmp_path / "bad.npz", kernel=np.ones((1, 1, 2, 2)))
    np.savez(tmp_path / "big.npz", weight=np.ones((1, 3, 9, 9)), padding=1)
    code, out, err = cli(capsys, *[a.format(d=tmp_path) for a in argv])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("convnet explain: error: ") and message in err


def test_cli_explain_exits_nonzero_on_a_mismatch(capsys, monkeypatch):
    real = R.max_pool2d
    monkeypatch.setattr(R, "max_pool2d", lambda *a, **k: real(*a, **k) * 2)
    code, out, _ = cli(capsys, "explain", "pool")
    assert code == 1 and "!!! MISMATCH: max pooling" in out


def test_cli_explain_rejects_an_unknown_part(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(capsys, "explain", "unpool")
    assert exc.value.code == 2
    assert "invalid choice: 'unpool'" in capsys.readouterr().err


def test_steps_are_the_printed_replay_as_data():
    text, _ = run()
    parts = E.steps()
    assert [p["title"] for p in parts] == ["", "Convolution forward",
                                           "Convolution backward (sensitivity maps and filter gradients)",
                                           "Pooling: 2x2 windows, stride 2"]
    flat = squash(text)
    tables = checks = 0
    for part in parts:
        assert part["title"] in text
        for step in part["steps"]:
            assert step["title"] in text
            for item in step["items"]:
                if "cells" in item:  # every table, cell for cell, is what explain prints under its label
                    tables += 1
                    rows = ",".join("[" + ",".join(row) + "]" for row in item["cells"])
                    assert squash(item["label"]) + ":[" + rows + "]" in flat
                elif "check" in item:
                    checks += 1
                    assert item["ok"] and "check: " + item["check"] in text
                else:
                    assert item["text"] in text
    assert tables > 40 and checks >= 12
    conv = parts[1]["steps"][-1]["items"]
    assert conv[0] == {"label": "feature map 0", "cells": [["6", "7", "5"], ["3", "-1", "-1"], ["2", "-1", "4"]]}


def test_steps_record_a_mismatch_as_a_failed_check(monkeypatch):
    real = R.max_pool2d
    monkeypatch.setattr(E.R, "max_pool2d", lambda x, k, s: real(x, k, s) + 1)
    items = [i for part in E.steps("pool") for step in part["steps"] for i in step["items"] if "check" in i]
    bad = [i for i in items if not i["ok"]]
    assert len(bad) == 1 and "max pooling: engine and loop reference disagree" in bad[0]["check"]
    with pytest.raises(ValueError, match="part must be"):
        E.steps("softmax")
