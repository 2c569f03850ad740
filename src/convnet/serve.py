"""``convnet serve``: a local web page to draw a digit and watch the network see it.

The page (``convnet/web/``: plain HTML, CSS and JavaScript, no build step, nothing fetched
from elsewhere) has three views:

* **Draw**: as you draw, the class probabilities, the feature maps of every conv and pooling
  layer and the saliency map (the input gradient from the engine's own backward pass).
* **Explain**: the tutorial's worked examples for conv, backward and pooling, step by step,
  with the numbers ``convnet explain`` prints (:func:`convnet.explain.steps`).
* **Train**: trains a fresh network on the bundled digits in a background thread; the page
  polls the learning curve and the first layer's filters, and can stop it.

The server is the standard library's :class:`http.server.ThreadingHTTPServer`. JSON endpoints
(all answers are JSON; errors are ``{"error": message}`` with a 4xx status, never a traceback):

``GET /api/model``
    The served network: input shape, classes, layers.
``POST /api/predict`` ``{"pixels": [C*H*W numbers in [0, 1]]}``
    Probabilities, logits, the predicted class, feature maps and saliency (maps are sent as
    base64 bytes, 0..255 over each layer's ``[lo, hi]`` range).
``GET /api/explain``
    The worked examples as data.
``GET /api/train``, ``POST /api/train`` ``{"epochs": int, "lr": number}``, ``POST /api/train/stop`` ``{}``
    Training state; start; stop.

Bodies must be ``application/json`` (which also makes a browser ask before sending one from
another site) and at most :data:`MAX_BODY` bytes, checked from ``Content-Length`` before
anything is read. When listening on a loopback address, requests must name it in their
``Host`` header (so another site cannot reach the server by DNS rebinding). The server reads
only its own page files and the bundled digits, and writes nothing: the model it serves was
loaded before it started, and the network trained in the Train view lives in memory.

The served model is used by one request at a time (its layers keep caches between forward
and backward), under a lock; the network being trained is a separate object.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from . import explain
from . import functional as F
from ._blas import get_num_threads, set_num_threads
from .layers import Conv2d
from .model import Sequential, lenet
from .plot import _describe, _layer_outputs, saliency_map

__all__ = ["MAX_BODY", "MAX_EPOCHS", "Inference", "Trainer", "make_server", "run_server"]

#: Largest accepted request body (a 64x64 drawing as JSON text is about 40 KB).
MAX_BODY = 64 * 1024
#: Most epochs one training run may ask for.
MAX_EPOCHS = 50
#: Largest learning rate accepted by the Train view.
MAX_LR = 1.0
#: Drawn inputs: one grey channel, each side in this range.
SIDE_RANGE = (8, 64)

_PAGES = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}


class HttpError(Exception):
    """A request the server refuses: ``status`` and a one-line message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- encoding

def _bytes(a: np.ndarray, lo: float, hi: float) -> str:
    """``a`` mapped from [lo, hi] to 0..255, as base64 text."""
    scaled = (a.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(a.shape)
    return base64.b64encode(np.clip(np.rint(scaled * 255), 0, 255).astype(np.uint8).tobytes()).decode("ascii")


def encode_maps(maps: np.ndarray) -> dict[str, Any]:
    """A stack of maps (n, h, w) as ``{"shape", "lo", "hi", "signed", "data"}``.

    One range per stack: symmetric around 0 when any value is negative (``signed``), else
    ``[0, max]``. ``data`` is base64 of n*h*w bytes, row-major: byte ``b`` stands for
    ``lo + b / 255 * (hi - lo)``.
    """
    maps = np.asarray(maps)
    signed = bool(maps.size and float(maps.min()) < 0)
    top = float(np.max(np.abs(maps))) if maps.size else 0.0
    lo, hi = (-top, top) if signed else (0.0, top)
    return {"shape": list(maps.shape), "lo": lo, "hi": hi, "signed": signed, "data": _bytes(maps, lo, hi)}


# --------------------------------------------------------------------------- BLAS threads

class _OneBlasThread:
    """Context manager: numpy's BLAS runs one thread while a server is open (or anyone uses it).

    One image's GEMMs are tiny, and on a busy 2-core machine a second BLAS thread that has to
    be woken made a prediction about 10x slower (measured 120-250 ms against 13-20 ms); the
    training thread takes one core and leaves the other to the page's requests. Resizing the
    pool is itself slow (about 150 ms a request when done per request, measured), so the server
    holds it at one thread from start to close. The count is process-wide, so users are
    counted: the first sets 1, the last restores the count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._before: int | None = None

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._before = get_num_threads()
                set_num_threads(1)
            self._users += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._before is not None:
                set_num_threads(self._before)


_one_blas_thread = _OneBlasThread()


# --------------------------------------------------------------------------- the served model

class Inference:
    """The served model: predictions with feature maps and saliency, one request at a time.

    Parameters
    ----------
    model : Sequential
        A classifier of grey images: ``input_shape`` (1, H, W) with H and W in
        :data:`SIDE_RANGE`, logits (N, K) out.
    """

    def __init__(self, model: Sequential) -> None:
        if not isinstance(model, Sequential):
            raise TypeError(f"model must be a Sequential, got {type(model).__name__}")
        shape = model.input_shape
        lo, hi = SIDE_RANGE
        if shape is None or len(shape) != 3 or shape[0] != 1 or not (lo <= shape[1] <= hi and lo <= shape[2] <= hi):
            raise ValueError(f"convnet serve draws one grey channel of {lo}..{hi} pixels a side, so the model's "
                             f"input shape must be (1, H, W) with H and W in that range; this model's is {shape}")
        self.model = model
        self.input_shape = tuple(int(s) for s in shape)
        self.dtype = model.dtype or np.float32
        self._lock = threading.Lock()
        with self._lock:
            logits = model.predict(np.zeros((1, *self.input_shape), self.dtype))
        if logits.ndim != 2:
            raise ValueError(f"convnet serve needs a classifier (logits of shape (N, K)); this model outputs "
                             f"shape {logits.shape[1:]} per image")
        self.classes = int(logits.shape[1])

    def describe(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "classes": self.classes,
                "layers": [_describe(i, layer) for i, layer in enumerate(self.model.layers)],
                "parameters": self.model.num_parameters()}

    def pixels(self, body: Any) -> np.ndarray:
        """Check a predict request ``{"pixels": [...]}``; the image as (1, 1, H, W) model dtype."""
        if not isinstance(body, dict) or set(body) != {"pixels"}:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise HttpError(400, f'the body must be an object with one key "pixels", got {keys}')
        values = body["pixels"]
        n = int(np.prod(self.input_shape))
        if not isinstance(values, list) or len(values) != n:
            size = len(values) if isinstance(values, list) else type(values).__name__
            raise HttpError(400, f"pixels must be a list of {n} numbers ({'x'.join(map(str, self.input_shape))}, "
                                 f"row by row), got {size}")
        if not all(type(v) in (int, float) for v in values):
            bad = next(v for v in values if type(v) not in (int, float))
            raise HttpError(400, f"pixels must be numbers, got {json.dumps(bad)[:40]}")
        try:
            a = np.array(values, dtype=np.float64)
        except OverflowError:  # an integer beyond float range
            raise HttpError(400, "pixels must be finite numbers in [0, 1], got a huge integer") from None
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise HttpError(400, f"pixels must be finite numbers in [0, 1], got values in [{a.min()}, {a.max()}]")
        return a.astype(self.dtype).reshape(1, *self.input_shape)

    def predict(self, x: np.ndarray) -> dict[str, Any]:
        """Probabilities, feature maps and saliency of one image ``x`` (1, C, H, W)."""
        with self._lock, _one_blas_thread:
            maps = _layer_outputs(self.model, x)
            grad, pred, logits = saliency_map(self.model, x)
        probs = F.softmax(logits.astype(np.float64))
        return {
            "predicted": pred,
            "probabilities": [float(p) for p in probs],
            "logits": [float(v) for v in logits],
            "maps": [{"name": name, **encode_maps(m)} for name, m in maps],
            "saliency": encode_maps(grad),
        }


# --------------------------------------------------------------------------- training in the background

class _Stopped(Exception):
    """Raised inside ``fit`` (from the per-batch hook) when the page asks to stop."""


class Trainer:
    """Trains a fresh network on the bundled digits in a background thread.

    ``fit`` calls the augmentation hook once per batch; the hook here also counts batches,
    copies the first layer's filters every few batches (so the page sees them change) and
    stops the run when asked. Only the training thread touches the network; readers get
    copies under a lock.

    Parameters
    ----------
    limit : train on only the first ``limit`` training digits (tests; None: all 4,000).
    make_model : builds the network to train from a seed (default :func:`convnet.lenet`).
    """

    FILTER_EVERY = 5   # batches between filter snapshots

    def __init__(self, limit: int | None = None, make_model: Callable[..., Sequential] = lenet,
                 seed: int = 0, batch_size: int = 32) -> None:
        self.limit, self.make_model, self.seed, self.batch_size = limit, make_model, seed, batch_size
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._data = None
        self._state: dict[str, Any] = {"status": "idle", "message": "", "epochs": 0, "lr": None, "epoch": 0,
                                       "batch": 0, "batches": 0, "train_images": 0, "history": [], "filters": None,
                                       "version": 0}

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self._state.update(changes)
            self._state["version"] += 1

    def state(self) -> dict[str, Any]:
        """A copy of the training state (status, epochs, batch progress, history, filters)."""
        with self._lock:
            out = dict(self._state)
            out["history"] = list(out["history"])
        return out

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @staticmethod
    def check_request(body: Any) -> tuple[int, float]:
        """``(epochs, lr)`` from a start request, or :class:`HttpError` 400."""
        if not isinstance(body, dict) or not set(body) <= {"epochs", "lr"} or "epochs" not in body:
            keys = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise HttpError(400, f'the body must be an object with "epochs" and optionally "lr", got {keys}')
        epochs, lr = body["epochs"], body.get("lr", 1e-3)
        if type(epochs) is not int or not 1 <= epochs <= MAX_EPOCHS:
            raise HttpError(400, f"epochs must be an integer from 1 to {MAX_EPOCHS}, got {json.dumps(epochs)[:40]}")
        if type(lr) not in (int, float) or not 0 < lr <= MAX_LR or not math.isfinite(lr):
            raise HttpError(400, f"lr must be a number in (0, {MAX_LR:g}], got {json.dumps(lr)[:40]}")
        return epochs, float(lr)

    def start(self, epochs: int, lr: float) -> None:
        """Start training (in a daemon thread); :class:`HttpError` 409 if a run is going on."""
        with self._lock:
            if self.running:
                raise HttpError(409, "training is already running; stop it first")
            self._stop.clear()
            self._state.update(status="running", message="", epochs=epochs, lr=lr, epoch=0, batch=0,
                               batches=0, train_images=0, history=[], filters=None)
            self._state["version"] += 1
            self._thread = threading.Thread(target=self._run, args=(epochs, lr), name="convnet-train", daemon=True)
            self._thread.start()

    def stop(self, wait: float | None = None) -> None:
        """Ask a running training to stop after its current batch; optionally wait for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None and wait is not None:
            thread.join(wait)

    def _filters(self, model: Sequential) -> dict[str, Any] | None:
        conv = next((layer for layer in model.layers if isinstance(layer, Conv2d)), None)
        if conv is None:
            return None
        w = conv.weight
        return encode_maps(w.reshape(-1, *w.shape[2:]))

    def _run(self, epochs: int, lr: float) -> None:
        from .datasets import load_mnist_5k, random_shift
        from .optim import Adam, cosine_schedule
        from .training import fit

        try:
            if self._data is None:
                x_train, y_train, x_test, y_test = load_mnist_5k()
                if self.limit is not None:
                    x_train, y_train = x_train[:self.limit], y_train[:self.limit]
                self._data = x_train, y_train, x_test, y_test
            x_train, y_train, x_test, y_test = self._data
            model = self.make_model(rng=self.seed)
            batches = math.ceil(len(x_train) / self.batch_size)
            self._update(batches=batches, train_images=len(x_train), filters=self._filters(model))
            count = 0

            def hook(xb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
                nonlocal count
                if self._stop.is_set():
                    raise _Stopped
                count += 1
                changes: dict[str, Any] = {"epoch": (count - 1) // batches + 1, "batch": (count - 1) % batches + 1}
                if count % self.FILTER_EVERY == 0:
                    changes["filters"] = self._filters(model)
                self._update(**changes)
                return random_shift(xb, rng)

            def epoch_end(record: dict) -> None:
                with self._lock:
                    self._state["history"] = self._state["history"] + [dict(record)]
                self._update(filters=self._filters(model))

            with _one_blas_thread:
                fit(model, x_train, y_train, epochs=epochs, batch_size=self.batch_size, optimizer=Adam(lr=lr),
                    lr_schedule=cosine_schedule(lr, epochs), validation_data=(x_test, y_test), seed=self.seed,
                    progress=False, augment=hook, on_epoch_end=epoch_end, blas_threads=1)
            self._update(status="done", message=f"trained {epochs} epoch{'s' if epochs > 1 else ''}")
        except _Stopped:
            self._update(status="stopped", message="stopped")
        except Exception as exc:  # shown on the page; the server keeps going
            self._update(status="failed", message=f"training failed: {exc}")


# --------------------------------------------------------------------------- HTTP

def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


class _Handler(BaseHTTPRequestHandler):
    server_version = "convnet"
    timeout = 30  # seconds a client may take to send its request (a stalled one frees its thread)
    disable_nagle_algorithm = True  # headers and body leave at once, not 40 ms apart (delayed ACKs)
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log:
            super().log_message(format, *args)

    # -- responses
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

    # -- requests
    def _check_host(self) -> None:
        allowed = self.server.allowed_hosts
        if allowed is not None and (self.headers.get("Host") or "").lower() not in allowed:
            raise HttpError(403, f"unexpected Host header {self.headers.get('Host')!r}: open the address the "
                                 f"server printed")

    def _body(self) -> Any:
        """The JSON body, checked: content type, length (before reading), syntax."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HttpError(415, f"the body must be JSON with Content-Type application/json, got {ctype or 'none'!r}")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HttpError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise HttpError(400, f"Content-Length must be a number of bytes, got {length[:40]!r}") from None
        if n < 0:
            raise HttpError(400, f"Content-Length must not be negative, got {n}")
        if n > MAX_BODY:
            raise HttpError(413, f"the body is {n} bytes; at most {MAX_BODY} are accepted")
        try:
            raw = self.rfile.read(n)
        except TimeoutError:
            raise HttpError(408, f"the body did not arrive within {self.timeout} s") from None
        if len(raw) != n:
            raise HttpError(400, f"the body ended after {len(raw)} of {n} bytes")
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise HttpError(400, f"the body is not valid JSON: {str(exc)[:120]}") from None

    def _dispatch(self, routes: dict[str, Callable[[_Handler], None]]) -> None:
        try:
            self._check_host()
            path = urlsplit(self.path).path
            route = routes.get(path)
            if route is None:
                other = self.server.post_routes if self.command != "POST" else self.server.get_routes
                if path in other:
                    raise HttpError(405, f"{self.command} is not allowed on {path}")
                raise HttpError(404, f"no such page or endpoint: {path[:80]}")
            route(self)
        except HttpError as exc:
            if self.command == "POST":
                self.close_connection = True  # the body may be unread
            self._json(exc.status, {"error": str(exc)})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug, not a bad request: say so in one line, keep serving
            print(f"convnet serve: internal error on {self.command} {self.path[:80]}: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            self.close_connection = True
            self._json(500, {"error": f"internal error ({type(exc).__name__}); see the server's output"})

    def do_GET(self) -> None:
        self._dispatch(self.server.get_routes)

    def do_HEAD(self) -> None:
        self._dispatch(self.server.get_routes)

    def do_POST(self) -> None:
        self._dispatch(self.server.post_routes)

    # -- endpoints
    def page(self) -> None:
        name, ctype = _PAGES[urlsplit(self.path).path]
        self._send(200, self.server.pages[name], ctype)

    def model_info(self) -> None:
        self._json(200, {**self.server.inference.describe(), "name": self.server.model_name})

    def predict(self) -> None:
        x = self.server.inference.pixels(self._body())
        self._json(200, self.server.inference.predict(x))

    def explain_steps(self) -> None:
        self._send(200, self.server.explain_json, "application/json")

    def train_state(self) -> None:
        self._json(200, self.server.trainer.state())

    def train_start(self) -> None:
        epochs, lr = Trainer.check_request(self._body())
        self.server.trainer.start(epochs, lr)
        self._json(202, self.server.trainer.state())

    def train_stop(self) -> None:
        body = self._body()
        if body != {}:
            raise HttpError(400, "the body of a stop request must be {}")
        self.server.trainer.stop()
        self._json(200, self.server.trainer.state())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], inference: Inference, trainer: Trainer, model_name: str,
                 log: bool) -> None:
        super().__init__(address, _Handler)
        self.inference, self.trainer, self.model_name, self.log = inference, trainer, model_name, log
        web = resources.files("convnet") / "web"
        self.pages = {name: (web / name).read_bytes() for name, _ in _PAGES.values()}
        self.explain_json = json.dumps(explain.steps()).encode()
        self.get_routes = {**{p: _Handler.page for p in _PAGES}, "/api/model": _Handler.model_info,
                           "/api/explain": _Handler.explain_steps, "/api/train": _Handler.train_state}
        self.post_routes = {"/api/predict": _Handler.predict, "/api/train": _Handler.train_start,
                            "/api/train/stop": _Handler.train_stop}
        host, port = self.server_address[:2]
        # On a loopback address, only names of this machine may appear in Host (no DNS rebinding).
        self.allowed_hosts: set[str] | None = None
        if ipaddress.ip_address(host).is_loopback:
            names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
            self.allowed_hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
        _one_blas_thread.__enter__()
        self._holds_blas = True

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        """Stop training (waiting briefly) and close the socket."""
        self.trainer.stop(wait=5.0)
        self.server_close()
        if self._holds_blas:
            self._holds_blas = False
            _one_blas_thread.__exit__(None, None, None)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(model: Sequential, host: str = "127.0.0.1", port: int = 0, *, model_name: str = "model",
                trainer: Trainer | None = None, log: bool = False) -> _Server:
    """A ready (bound, not yet serving) server for ``model``; ``port=0`` picks a free port.

    Call ``serve_forever()`` (e.g. in a thread), then ``shutdown()`` and ``close()``; ``url``
    is the page's address.
    """
    server_class = _Server6 if ":" in host else _Server
    return server_class((host, port), Inference(model), trainer or Trainer(), model_name, log)

def run_server(server: _Server, out: Callable[[str], Any] = print) -> int:
    """Print the address, serve until Ctrl-C, then stop training and close; returns 0."""
    out(f"convnet serve: {server.model_name} on {server.url}  (Ctrl-C to stop)")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out("convnet serve: stopped")
    finally:
        server.close()
    return 0
