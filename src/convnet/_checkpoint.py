"""Training checkpoints: a model file plus everything resuming needs.

``fit(checkpoint=path)`` writes, atomically after every completed epoch, the model file
(architecture and weights, see :mod:`convnet.model`; ``convnet.load`` reads it as a
model) with these extra members:

* ``__training__``: JSON ``{"format": "convnet.training", "version": 1, "epoch": k,
  "settings": {...}, "optimizer": {"type": "Adam", "config": {...}, "lr": ...,
  "scalars": {"0.weight": {"step": 250}, ...}, "arrays": {"0.weight": ["m", "v"], ...}},
  "rng": {"shuffle": <bit generator state>, "augment": ..., "layers": {"9": ...}},
  "history": [...], "sha256": <digest of the optimizer arrays>}``
* ``__training__/<parameter>/<key>``: the optimizer's arrays (Adam moments, momentum buffers).

``fit(resume_from=path)`` checks that the call trains the same model on the same data with
the same settings, restores weights, optimizer state, random generators and history, and
continues with the next epoch, so an interrupted and resumed run ends with the same
weights, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from . import _args
from ._npz import NpzArchive
from .model import TRAINING_STATE_PREFIX, ModelFileError, Sequential, _atomic_savez, _digest, load
from .optim import Optimizer

FORMAT_NAME = "convnet.training"
FORMAT_VERSION = 1
_STATE_KEY = TRAINING_STATE_PREFIX
#: Largest training-state JSON read (the history grows by ~200 bytes an epoch).
MAX_STATE_BYTES = 64 << 20


class ResumeError(ValueError):
    """A checkpoint cannot be resumed: it holds no training state, is damaged, or was
    written by a different model, optimizer, data set or setting (the message says which)."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    return value


def layer_rngs(layers: list, prefix: str = "") -> dict[str, np.random.Generator]:
    """The random generators layers own (e.g. Dropout's masks), by layer path ("9", "3.1")."""
    out: dict[str, np.random.Generator] = {}
    for i, layer in enumerate(layers):
        name = f"{prefix}{i}"
        if isinstance(getattr(layer, "rng", None), np.random.Generator):
            out[name] = layer.rng
        inner = getattr(layer, "layers", None)
        if isinstance(inner, list):
            out.update(layer_rngs(inner, name + "."))
    return out


def optimizer_config(optimizer: Optimizer) -> dict[str, Any]:
    """Hyperparameters that must match for a resumed run (``lr`` follows the schedule;
    private attributes are caches, e.g. Adam's flat moment buffers)."""
    return _jsonable({k: v for k, v in sorted(vars(optimizer).items())
                      if k not in ("state", "lr") and not k.startswith("_")})


def data_digest(x: np.ndarray, y: np.ndarray) -> str:
    """Fingerprint of the training data, so a resume on other data is refused."""
    import hashlib

    h = hashlib.sha256()
    for a in (x, y):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def save(path: str, model: Sequential, optimizer: Optimizer, *, epoch: int, settings: dict[str, Any],
         rngs: dict[str, np.random.Generator], history: list[dict]) -> None:
    """Write the model and the training state after ``epoch`` to ``path``, atomically."""
    arrays = model._file_arrays()
    opt_arrays: dict[str, np.ndarray] = {}
    scalars: dict[str, dict[str, int]] = {}
    layout: dict[str, list[str]] = {}
    for pname, st in optimizer.state.items():
        for key, value in st.items():
            if isinstance(value, np.ndarray):
                opt_arrays[f"{_STATE_KEY}/{pname}/{key}"] = np.ascontiguousarray(value)
                layout.setdefault(pname, []).append(key)
            else:
                scalars.setdefault(pname, {})[key] = _jsonable(value)
    state = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "epoch": epoch,
        "settings": _jsonable(settings),
        "optimizer": {"type": type(optimizer).__name__, "config": optimizer_config(optimizer),
                      "lr": float(optimizer.lr), "scalars": scalars, "arrays": layout},
        "rng": {"loop": {k: g.bit_generator.state for k, g in rngs.items()},
                "layers": {k: g.bit_generator.state for k, g in layer_rngs(model.layers).items()}},
        "history": _jsonable(history),
        "sha256": _digest(opt_arrays),
    }
    arrays[_STATE_KEY] = np.array(json.dumps(state))
    arrays.update(opt_arrays)
    _atomic_savez(path, arrays)


class Checkpoint:
    """A checkpoint read back: the model it holds, and its training state (checked)."""

    def __init__(self, path: str, model: Sequential, state: dict[str, Any], arrays: dict[str, np.ndarray]):
        self.path, self.model, self.state, self.arrays = path, model, state, arrays

    @property
    def epoch(self) -> int:
        return self.state["epoch"]


def read(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save`; ``ResumeError`` if it holds no usable state.

    Like :func:`convnet.load`, it checks every size before allocating: the optimizer
    arrays must have their parameters' shapes and dtypes, the JSON at most
    ``MAX_STATE_BYTES``.
    """
    path = os.fspath(path)
    model = load(path)  # FileNotFoundError / ModelFileError for a missing or bad model file
    params = {p.name: p.data for p in model.parameters()}
    with NpzArchive(path, ResumeError) as npz:
        if _STATE_KEY not in npz.members:
            raise ResumeError(f"{path} holds no training state to resume from (a finished model, or one "
                              f"saved with model.save); train without resuming to start anew")
        raw = npz.read_small(_STATE_KEY, MAX_STATE_BYTES)
        arrays: dict[str, np.ndarray] = {}
        for name in npz.members:
            if not name.startswith(_STATE_KEY + "/"):
                continue
            key = name[len(_STATE_KEY) + 1:]
            pname = key.rsplit("/", 1)[0]
            head = npz.header(name)
            target = params.get(pname)
            if target is None or head.shape != target.shape or head.dtype.newbyteorder("=") != target.dtype:
                raise ResumeError(f"{path}: training state is corrupted (optimizer array {key} {head.dtype} "
                                  f"{head.shape} does not fit the model)")
            arrays[key] = np.empty(target.shape, target.dtype)
            npz.read_into(name, arrays[key])
    if raw.shape != () or raw.dtype.kind != "U":
        raise ResumeError(f"{path}: training state is not a JSON string")
    try:
        state = json.loads(str(raw))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ResumeError(f"{path}: training state JSON is corrupted ({type(exc).__name__})") from None
    _check_state(path, state, arrays)
    return Checkpoint(path, model, state, arrays)


def _check_state(path: str, state: Any, arrays: dict[str, np.ndarray]) -> None:
    def bad(what: str) -> ResumeError:
        return ResumeError(f"{path}: training state is corrupted ({what})")

    if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
        raise bad("not a convnet training state")
    if state.get("version") != FORMAT_VERSION:
        raise ResumeError(f"{path}: unsupported training state version {state.get('version')!r} "
                          f"(this convnet reads version {FORMAT_VERSION})")
    epoch = state.get("epoch")
    if not (_args.is_int(epoch) and epoch >= 1):
        raise bad(f"epoch {epoch!r}")
    for key, kind in (("settings", dict), ("optimizer", dict), ("rng", dict), ("history", list)):
        if not isinstance(state.get(key), kind):
            raise bad(f"no {key}")
    if len(state["history"]) != epoch or not all(isinstance(r, dict) for r in state["history"]):
        raise bad(f"history of {len(state['history'])} epochs for epoch {epoch}")
    opt = state["optimizer"]
    if not all(isinstance(opt.get(k), dict) for k in ("config", "scalars", "arrays")):
        raise bad("optimizer")
    listed = {f"{p}/{k}" for p, keys in opt["arrays"].items() if isinstance(keys, list) for k in keys}
    if listed != set(arrays):
        raise bad(f"optimizer arrays {sorted(set(arrays) ^ listed)[:3]} listed or stored alone")
    if state.get("sha256") != _digest({f"{_STATE_KEY}/{k}": v for k, v in arrays.items()}):
        raise bad("optimizer state checksum mismatch")


def restore(ckpt: Checkpoint, model: Sequential, optimizer: Optimizer, settings: dict[str, Any],
            rngs: dict[str, np.random.Generator]) -> list[dict]:
    """Put the checkpoint's weights, optimizer state and generator states into this run;
    returns the history so far. Refuses (``ResumeError``) a different model, optimizer,
    data or setting, before changing anything."""
    path, state = ckpt.path, ckpt.state
    mine = model.architecture()["layers"]
    theirs = ckpt.model.architecture()["layers"]
    if json.loads(json.dumps(mine)) != theirs:
        raise ResumeError(f"cannot resume from {path}: it was written for a different model")
    saved = state["settings"]
    for key, value in _jsonable(settings).items():
        if saved.get(key) != value:
            what = "the training data differ" if key == "data_sha256" else \
                f"it was written with {key}={saved.get(key)!r}, this run has {key}={value!r}"
            raise ResumeError(f"cannot resume from {path}: {what}")
    opt = state["optimizer"]
    if opt.get("type") != type(optimizer).__name__ or opt["config"] != optimizer_config(optimizer):
        raise ResumeError(f"cannot resume from {path}: it was written with optimizer {opt.get('type')} "
                          f"{opt['config']}, this run uses {optimizer!r}")
    layer_gens = layer_rngs(model.layers)
    saved_rngs = state["rng"]
    if set(saved_rngs.get("loop", {})) != set(rngs) or set(saved_rngs.get("layers", {})) != set(layer_gens):
        raise ResumeError(f"{path}: training state is corrupted (random generators do not match the run)")
    new_state: dict[str, dict] = {}
    for pname, keys in opt["arrays"].items():
        new_state[pname] = {k: ckpt.arrays[f"{pname}/{k}"].copy() for k in keys}
    for pname, values in opt["scalars"].items():
        if pname not in new_state and pname not in {p.name for p in model.parameters()}:
            raise ResumeError(f"{path}: training state is corrupted (optimizer state for unknown {pname!r})")
        for k, v in values.items():
            if not (_args.is_int(v) and v >= 0):
                raise ResumeError(f"{path}: training state is corrupted (optimizer {pname}.{k} = {v!r})")
            new_state.setdefault(pname, {})[k] = v
    lr = opt.get("lr")
    if not (_args.is_real(lr) and 0 < lr < math.inf):
        raise ResumeError(f"{path}: training state is corrupted (lr {lr!r})")
    # Set the generators on copies first: an invalid state raises before anything changes.
    trial = {}
    for group, gens in (("loop", rngs), ("layers", layer_gens)):
        for name, gen in gens.items():
            copy = np.random.Generator(type(gen.bit_generator)())
            try:
                copy.bit_generator.state = saved_rngs[group][name]
            except (TypeError, ValueError, KeyError) as exc:
                raise ResumeError(f"{path}: training state is corrupted (generator {name}: {exc})") from None
            trial[(group, name)] = (gen, saved_rngs[group][name])
    # Everything checked: now change the run.
    for p, q in zip(model.parameters(), ckpt.model.parameters()):
        p.data[...] = q.data
    for (_, b), (_, saved_b) in zip(model.named_buffers(), ckpt.model.named_buffers()):
        b[...] = saved_b  # batch norm's running estimates
    if model.input_shape is None:
        model.input_shape = ckpt.model.input_shape
    optimizer.state = new_state
    optimizer.lr = float(lr)
    for gen, value in trial.values():
        gen.bit_generator.state = value
    return [dict(r) for r in state["history"]]


__all__ = ["ResumeError", "save", "read", "restore", "Checkpoint", "ModelFileError"]
