"""`convnet serve`: the JSON endpoints, their input checks, concurrency, training, the command."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources

import numpy as np
import pytest

import convnet
import convnet.functional as F
from convnet import explain, plot, serve
from convnet.layers import AvgPool2d, Conv2d, MaxPool2d
from serving import digit, running_server, small_model
from test_cli import SCRIPT, assert_one_line_error, run


def request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
    """(status, parsed JSON answer); ``body`` is sent as JSON unless ``raw`` bytes are given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        head = {"Content-Type": "application/json"} if data is not None else {}
        head.update(headers or {})
        conn.request(method, path, body=data, headers=head)
        response = conn.getresponse()
        text = response.read().decode()
        assert "Traceback" not in text
        return response.status, (json.loads(text) if response.getheader("Content-Type") == "application/json"
                                 else text)
    finally:
        conn.close()


def raw_exchange(server, head: bytes, body: bytes = b"", eof: bool = True, timeout: float = 10) -> tuple[int, dict]:
    """Send bytes as they are (then end the sending side if ``eof``); return the answer's status and JSON."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as sock:
        sock.sendall(head + body)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks).decode()
    status = int(reply.split()[1])
    return status, json.loads(reply.split("\r\n\r\n", 1)[1])


def decode(block: dict) -> np.ndarray:
    """An encoded stack back to floats (within half a step of 1/255 of its range)."""
    data = np.frombuffer(base64.b64decode(block["data"]), dtype=np.uint8).reshape(block["shape"])
    return block["lo"] + data / 255 * (block["hi"] - block["lo"])


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def pixels_of(x: np.ndarray) -> list[float]:
    return [float(v) for v in x.ravel()]


# --------------------------------------------------------------------------- predictions

def test_predict_matches_the_model_with_maps_and_saliency(server):
    model = small_model()
    x = digit(3)
    status, out = request(server, "POST", "/api/predict", {"pixels": pixels_of(x)})
    assert status == 200, out
    logits = model.predict(x[None])[0]
    assert out["predicted"] == int(np.argmax(logits))
    np.testing.assert_allclose(out["probabilities"], F.softmax(logits.astype(np.float64)), rtol=1e-6, atol=1e-9)
    assert sum(out["probabilities"]) == pytest.approx(1)
    # One block per conv and pooling layer, named and shaped like the layer's output.
    layers = [(i, layer) for i, layer in enumerate(model.layers) if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d))]
    assert [b["name"].split(":")[0] for b in out["maps"]] == [f"layer {i}" for i, _ in layers]
    h = x[None]
    expected = []
    for layer in model.eval().layers:
        h = layer.forward(h)
        if isinstance(layer, (Conv2d, MaxPool2d, AvgPool2d)):
            expected.append(h[0])
    for block, want in zip(out["maps"], expected):
        assert block["shape"] == list(want.shape)
        step = (block["hi"] - block["lo"]) / 255
        assert np.max(np.abs(decode(block) - want)) <= step / 2 + 1e-6
        assert block["signed"] == bool(want.min() < 0)
    grad, pred, _ = plot.saliency_map(small_model(), x)
    assert pred == out["predicted"]
    sal = out["saliency"]
    assert np.max(np.abs(decode(sal) - grad)) <= (sal["hi"] - sal["lo"]) / 255 / 2 + 1e-7
    assert np.abs(grad).max() > 0


def test_model_info_and_pages(server):
    status, info = request(server, "GET", "/api/model")
    assert status == 200
    assert info["input_shape"] == [1, 28, 28] and info["classes"] == 10
    assert info["layers"][0].startswith("layer 0: Conv2d 1->4")
    status, page = request(server, "GET", "/")
    assert status == 200 and '<canvas id="pad"' in page and '<script src="/app.js">' in page
    for path in ("/app.js", "/style.css"):
        assert request(server, "GET", path)[0] == 200


def test_page_files_load_nothing_from_elsewhere():
    web = resources.files("convnet") / "web"
    names = sorted(p.name for p in web.iterdir())
    assert names == ["app.js", "index.html", "style.css"]
    for name in names:
        text = (web / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
        assert "@import" not in text


def test_explain_endpoint_is_explains_own_replay(server):
    status, parts = request(server, "GET", "/api/explain")
    assert status == 200
    assert parts == json.loads(json.dumps(explain.steps()))


# --------------------------------------------------------------------------- bad requests

GOOD = [0.0] * 784


@pytest.mark.parametrize("body, fragment", [
    ({"pixels": GOOD[:-1]}, "list of 784 numbers"),
    ({"pixels": GOOD + [0]}, "list of 784 numbers"),
    ({"pixels": [[0.0] * 28] * 28}, "list of 784 numbers"),
    ({"pixels": GOOD[:-1] + [1.5]}, "in [0, 1]"),
    ({"pixels": GOOD[:-1] + [-0.1]}, "in [0, 1]"),
    ({"pixels": GOOD[:-1] + [True]}, "must be numbers"),
    ({"pixels": GOOD[:-1] + ["0.5"]}, "must be numbers"),
    ({"pixels": GOOD[:-1] + [None]}, "must be numbers"),
    ({"pixels": "0" * 784}, "list of 784"),
    ({"pixels": GOOD, "extra": 1}, 'one key "pixels"'),
    ({}, 'one key "pixels"'),
    ([GOOD], 'one key "pixels"'),
])
def test_predict_rejects_bad_pixels(server, body, fragment):
    status, out = request(server, "POST", "/api/predict", body)
    assert status == 400 and fragment in out["error"], out


@pytest.mark.parametrize("raw, fragment", [
    (b'{"pixels": [NaN' + b", 0" * 783 + b"]}", "NaN is not a number JSON allows"),
    (b'{"pixels": [Infinity' + b", 0" * 783 + b"]}", "Infinity is not a number"),
    (b'{"pixels": [1e999' + b", 0" * 783 + b"]}", "finite numbers in [0, 1]"),
    (b'{"pixels": [1' + b"0" * 400 + b", 0" * 783 + b"]}", "finite numbers in [0, 1], got a huge integer"),
    (b'{"pixels": [1' + b"0" * 5000 + b", 0" * 783 + b"]}", "not valid JSON"),
    (b'{"pixels": [0, 0', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 60000, "not valid JSON"),
])
def test_predict_rejects_bad_json(server, raw, fragment):
    status, out = request(server, "POST", "/api/predict", raw=raw)
    assert status == 400 and fragment in out["error"], out


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_predict_wants_json_content_type(server, content_type):
    status, out = request(server, "POST", "/api/predict", {"pixels": GOOD}, headers={"Content-Type": content_type})
    assert status == 415 and "application/json" in out["error"]


def test_huge_body_is_refused_from_its_length_before_reading_it(server):
    # Only the headers are sent: an answer (instead of a timeout) shows the body was never waited for.
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n" % server.server_address[1])
    status, out = raw_exchange(server, head, eof=False)
    assert status == 413 and str(serve.MAX_BODY) in out["error"]
    # Just over the limit, sent whole.
    body = b'{"pixels": [' + b"0," * (serve.MAX_BODY // 2) + b"0]}"
    status, out = request(server, "POST", "/api/predict", raw=body)
    assert status == 413


@pytest.mark.parametrize("length, status, fragment", [
    (None, 411, "Content-Length header is required"),
    (b"-5", 400, "must not be negative"),
    (b"12abc", 400, "number of bytes"),
    (b"50", 400, "ended after 2 of 50 bytes"),
])
def test_bad_content_length(server, length, status, fragment):
    head = b"POST /api/predict HTTP/1.0\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n" \
        % server.server_address[1]
    if length is not None:
        head += b"Content-Length: " + length + b"\r\n"
    sock_status, out = raw_exchange(server, head + b"\r\n", b"{}" if length == b"50" else b"")
    assert sock_status == status and fragment in out["error"], out


def test_wrong_paths_methods_and_hosts(server):
    assert request(server, "GET", "/nope")[0] == 404
    assert request(server, "GET", "/../../etc/passwd")[0] == 404
    assert request(server, "GET", "/web/app.js")[0] == 404
    assert request(server, "GET", "/api/predict")[0] == 405
    assert request(server, "POST", "/", {})[0] == 405
    assert request(server, "PUT", "/api/predict", {})[0] == 501
    status, out = request(server, "GET", "/", headers={"Host": "attacker.example:80"})
    assert status == 403 and "Host" in out["error"]
    port = server.server_address[1]
    assert request(server, "GET", "/api/model", headers={"Host": f"localhost:{port}"})[0] == 200


@pytest.mark.parametrize("body, fragment", [
    ({"epochs": 0}, "epochs must be an integer from 1 to 50"),
    ({"epochs": 51}, "epochs must be"),
    ({"epochs": 1.5}, "epochs must be"),
    ({"epochs": "3"}, "epochs must be"),
    ({"epochs": True}, "epochs must be"),
    ({"epochs": 1, "lr": 0}, "lr must be a number in (0, 1]"),
    ({"epochs": 1, "lr": -1e-3}, "lr must be"),
    ({"epochs": 1, "lr": 2}, "lr must be"),
    ({"epochs": 1, "lr": "fast"}, "lr must be"),
    ({"lr": 0.001}, '"epochs"'),
    ({"epochs": 1, "seed": 3}, '"epochs"'),
])
def test_train_rejects_bad_requests(server, body, fragment):
    status, out = request(server, "POST", "/api/train", body)
    assert status == 400 and fragment in out["error"], out
    assert request(server, "GET", "/api/train")[1]["status"] in ("idle", "done", "stopped")


def test_stop_wants_an_empty_object(server):
    assert request(server, "POST", "/api/train/stop", {"now": True})[0] == 400
    assert request(server, "POST", "/api/train/stop", raw=b"{}", headers={"Content-Type": "text/plain"})[0] == 415


# --------------------------------------------------------------------------- training

def wait_for(get, until, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = get()
        if until(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out; last value {value!r}")


def test_train_runs_in_the_background_and_reports_each_epoch():
    with running_server() as s:
        status, state = request(s, "POST", "/api/train", {"epochs": 2, "lr": 0.003})
        assert status == 202 and state["status"] == "running"
        assert request(s, "POST", "/api/train", {"epochs": 1})[0] == 409
        # The page stays served while training runs.
        assert request(s, "POST", "/api/predict", {"pixels": pixels_of(digit(0))})[0] == 200
        done = wait_for(lambda: request(s, "GET", "/api/train")[1], lambda st: st["status"] != "running")
    assert done["status"] == "done", done["message"]
    assert [r["epoch"] for r in done["history"]] == [1, 2]
    assert all(0 <= r["val_accuracy"] <= 1 and r["loss"] > 0 for r in done["history"])
    assert done["train_images"] == 300 and done["batches"] == 10  # batches of 32
    assert (done["epoch"], done["batch"]) == (2, 10)
    filters = decode(done["filters"])
    assert filters.shape == (4, 5, 5) and np.abs(filters).max() > 0


def test_trainer_filters_are_the_networks_first_layer():
    seen = []
    trainer = serve.Trainer(limit=64, make_model=lambda rng: _recording(seen, rng))
    trainer.start(1, 1e-3)
    trainer.stop(wait=None)
    trainer._thread.join(60)
    state = trainer.state()
    assert state["status"] in ("stopped", "done")
    w = seen[0][0].weight
    assert np.max(np.abs(decode(state["filters"]) - w.reshape(-1, 5, 5))) <= \
        (state["filters"]["hi"] - state["filters"]["lo"]) / 255 / 2 + 1e-7


def _recording(seen, rng):
    from serving import small_lenet

    model = small_lenet(rng)
    seen.append(model)
    return model


def test_stop_ends_a_long_run_early():
    with running_server() as s:
        request(s, "POST", "/api/train", {"epochs": 50})
        wait_for(lambda: request(s, "GET", "/api/train")[1], lambda st: st["history"] or st["status"] != "running")
        status, _ = request(s, "POST", "/api/train/stop", {})
        assert status == 200
        state = wait_for(lambda: request(s, "GET", "/api/train")[1], lambda st: st["status"] != "running", 30)
        assert state["status"] == "stopped" and 1 <= len(state["history"]) < 50
        # Another run can start after a stop.
        assert request(s, "POST", "/api/train", {"epochs": 1})[0] == 202
        wait_for(lambda: request(s, "GET", "/api/train")[1], lambda st: st["status"] != "running")


# --------------------------------------------------------------------------- concurrency

def test_concurrent_predictions_while_training_match_one_at_a_time(server):
    model = small_model()
    images = [digit(i) for i in range(8)]
    expected = [model.predict(x[None])[0] for x in images]
    request(server, "POST", "/api/train", {"epochs": 3})
    results: dict[int, list] = {i: [] for i in range(len(images))}
    errors = []

    def worker(i):
        try:
            for _ in range(4):
                status, out = request(server, "POST", "/api/predict", {"pixels": pixels_of(images[i])})
                results[i].append((status, out["logits"], out["predicted"]))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    request(server, "POST", "/api/train/stop", {})
    server.trainer.stop(wait=30)
    assert not errors
    for i, want in enumerate(expected):
        assert len(results[i]) == 4
        for status, logits, pred in results[i]:
            assert status == 200 and pred == int(np.argmax(want))
            np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


def test_one_blas_thread_while_a_server_is_open_then_the_count_is_restored(server):
    from convnet._blas import get_num_threads, set_num_threads

    if get_num_threads() is None:
        pytest.skip("numpy's BLAS pool cannot be controlled here")
    assert get_num_threads() == 1  # the module's server is open
    users = serve._one_blas_thread._users
    with running_server() as s:
        assert serve._one_blas_thread._users == users + 1
        assert request(s, "POST", "/api/predict", {"pixels": pixels_of(digit(1))})[0] == 200
    assert serve._one_blas_thread._users == users
    before = get_num_threads()
    set_num_threads(2)
    try:
        one = serve._OneBlasThread()
        with one:                # e.g. a server
            assert get_num_threads() == 1
            with one:            # and a request meanwhile
                assert get_num_threads() == 1
            assert get_num_threads() == 1  # the first user still works
        assert get_num_threads() == 2
    finally:
        set_num_threads(before)


# --------------------------------------------------------------------------- inference checks

def colour_model() -> convnet.Sequential:
    return convnet.Sequential(convnet.Conv2d(3, 4, 3, rng=0), convnet.Flatten(),
                              convnet.Linear(4 * 30 * 30, 10, rng=0), input_shape=(3, 32, 32))


def test_inference_refuses_models_it_cannot_draw_for():
    with pytest.raises(ValueError, match=r"input shape must be \(1, H, W\).*\(3, 32, 32\)"):
        serve.Inference(colour_model())
    no_shape = convnet.Sequential(convnet.Flatten(), convnet.Linear(784, 10, rng=0))
    with pytest.raises(ValueError, match="None"):
        serve.Inference(no_shape)
    with pytest.raises(TypeError, match="Sequential"):
        serve.Inference("model.npz")


def test_encode_maps_ranges():
    block = serve.encode_maps(np.array([[[0.0, 1.0], [2.0, 4.0]]]))
    assert (block["lo"], block["hi"], block["signed"]) == (0.0, 4.0, False)
    assert list(base64.b64decode(block["data"])) == [0, 64, 128, 255]
    block = serve.encode_maps(np.array([[[-2.0, 0.0], [1.0, 2.0]]]))
    assert (block["lo"], block["hi"], block["signed"]) == (-2.0, 2.0, True)
    assert list(base64.b64decode(block["data"])) == [0, 128, 191, 255]
    assert list(base64.b64decode(serve.encode_maps(np.zeros((1, 2, 2)))["data"])) == [0, 0, 0, 0]


# --------------------------------------------------------------------------- the command

def test_serve_command_prints_the_address_and_stops_on_ctrl_c(tmp_path):
    path = tmp_path / "model.npz"
    small_model().save(path)
    env = {k: v for k, v in os.environ.items() if k != "CONVNET_DEBUG"}
    proc = subprocess.Popen([str(SCRIPT), "serve", str(path), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(rf"convnet serve: {re.escape(str(path))} on http://127\.0\.0\.1:(\d+)/  "
                             rf"\(Ctrl-C to stop\)\n", line)
        assert match, line
        port = int(match.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/model")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == "convnet serve: stopped\n" and err == ""


def test_serve_command_errors_are_one_line(tmp_path):
    assert_one_line_error(run("serve", tmp_path / "missing.npz"), 1, "missing.npz")
    assert_one_line_error(run("serve", "--port", "70000"), 2, "port number from 0 to 65535")
    colour_model().save(tmp_path / "colour.npz")
    assert_one_line_error(run("serve", tmp_path / "colour.npz", "--port", "0"), 1, "input shape must be (1, H, W)")
    small_model().save(tmp_path / "m.npz")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run("serve", tmp_path / "m.npz", "--port", port), 1,
                              f"cannot listen on 127.0.0.1 port {port}")


def test_serve_without_a_model_uses_the_default_path(tmp_path, monkeypatch):
    """With a model at the default path (as `make demo` leaves it), `convnet serve` loads it."""
    from convnet import cli

    (tmp_path / "out").mkdir()
    small_model().save(tmp_path / cli.DEFAULT_OUT)
    monkeypatch.chdir(tmp_path)
    served = {}

    def fake_run(server):
        served["server"] = server
        return 0

    monkeypatch.setattr(serve, "run_server", fake_run)
    assert cli.main(["serve", "--port", "0"]) == 0
    server = served["server"]
    try:
        assert server.model_name == cli.DEFAULT_OUT and server.server_address[0] == "127.0.0.1"
        assert server.inference.model.num_parameters() == small_model().num_parameters()
    finally:
        server.close()


def test_serve_trains_the_default_network_when_there_is_none(tmp_path, monkeypatch):
    from convnet import cli

    monkeypatch.chdir(tmp_path)
    trained = []

    def fake_train(args):  # the real one takes ~20 s; check it is asked for, with the default path
        trained.append(args.out)
        os.makedirs("out", exist_ok=True)
        small_model().save(args.out)
        return 0

    monkeypatch.setattr(cli, "cmd_train", fake_train)
    monkeypatch.setattr(serve, "run_server", lambda server: server.close() or 0)
    assert cli.main(["serve", "--port", "0"]) == 0
    assert trained == [cli.DEFAULT_OUT] and os.path.exists(tmp_path / cli.DEFAULT_OUT)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
