"""Checkpoint and resume for the training loops of an erasure fit.

:meth:`~efface.methods.base.ErasureMethod.fit` with a checkpoint directory runs the method inside
one :func:`checkpointing` block. There, every :func:`~efface.models.diffusion.train_steps` call (and
any other loop written with :func:`resumable`: DoCo's discriminator warm-up) is one *loop*, keyed
by its call index and name (``00-race``, ``01-race``, ``00-mace-circle``...). A loop writes
``<key>.safetensors`` every ``every`` iterations and once when it ends: the tensors it was handed
(the trained parameters, the optimizer, whatever mutable state the method registered), the fit's
seeded generator and torch's global RNG, the iteration and the losses so far. Tensors are stored
as safetensors, the rest as JSON in the file's metadata (no pickle); every write is atomic
(:func:`efface.io.atomic_file`). ``run.json`` records the run (method, preset, config, request,
seed, base sha256): a checkpoint of any other run is refused, never mixed in.

Resuming rests on one property of every method: what it computes *before* a loop (anchor images,
masks, encodings, initial weights) is a deterministic function of the seed and of the loops
before it. A resumed fit recomputes that prefix; each loop then restores its state: a loop that
finished in an earlier run returns at once with its final state, an interrupted one continues
after its last checkpoint. On the CPU the result equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from efface.errors import InputError
from efface.io import atomic_file

log = logging.getLogger(__name__)

FORMAT = 1
RUN_FILE = "run.json"
_META = "efface_checkpoint"


class Session:
    """An open checkpoint directory: where loops write, how often, the generator they save, and
    which loops resumed (``resumed``: key -> iteration)."""

    def __init__(self, directory: Path, every: int, generator: torch.Generator | None):
        self.directory, self.every, self.generator = directory, every, generator
        self.calls = 0
        self.resumed: dict[str, int] = {}


_ACTIVE: ContextVar[Session | None] = ContextVar("efface_checkpoint", default=None)


@contextmanager
def checkpointing(directory: str | Path, *, every: int, run: dict, generator: torch.Generator | None
                  ) -> Iterator[Session]:
    """Within the block, loops (:func:`resumable`) checkpoint into ``directory`` every ``every``
    iterations (0: only when each loop ends) and resume from it. ``run`` describes the run (JSON);
    a directory holding another run's checkpoint is refused with what differs."""
    if every < 0:
        raise InputError(f"checkpoint_every must be 0 or more, not {every}")
    directory = Path(directory)
    run = json.loads(json.dumps({"format": FORMAT, **run}, default=str))
    _open(directory, run)
    session = Session(directory, every, generator)
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def _open(directory: Path, run: dict) -> None:
    path = directory / RUN_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != run:
            raise InputError(f"{directory} holds the checkpoint of another run (different "
                             f"{', '.join(_differences(saved, run))}): rerun with the same options to resume it, "
                             f"or delete {directory} to start over")
        return
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} is not empty and holds no {RUN_FILE}: it is not an efface checkpoint; "
                         "choose another directory or delete it")
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(run, indent=2, sort_keys=True))


def _differences(saved: dict, run: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(run)):
        a, b = saved.get(key), run.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out


class Loop:
    """One loop's checkpoint. ``start``: the iteration to continue from (``total`` when ``done``);
    ``losses``: those so far (extend it, then call :meth:`step`); ``done``: the loop finished in an
    earlier run and its final state was restored. Without an open :func:`checkpointing` block every
    method is a no-op (``start`` 0)."""

    def __init__(self, session: Session | None, name: str, total: int, state: dict[str, Any]):
        self.session, self.name, self.total, self.state = session, name, total, state
        self.start, self.losses, self.done = 0, [], False
        self.path: Path | None = None
        if session is None:
            return
        key = f"{session.calls:02d}-{re.sub(r'[^A-Za-z0-9._]+', '-', name).strip('-')}"
        session.calls += 1
        self.path = session.directory / f"{key}.safetensors"
        if self.path.exists():
            self._restore(key)

    def step(self, count: int) -> None:
        """After iteration ``count - 1``: write a checkpoint when ``count`` is a multiple of ``every``
        (not at the end: :meth:`finish` writes that)."""
        every = self.session.every if self.session is not None else 0
        if every and count % every == 0 and count < self.total:
            self._write(count, done=False)

    def finish(self) -> None:
        """After the last iteration: write the loop's final state (unless restored as ``done``)."""
        if self.session is not None and not self.done:
            self._write(self.total, done=True)

    def _write(self, iteration: int, done: bool) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        payload = {"format": FORMAT, "name": self.name, "iteration": iteration, "total": self.total, "done": done,
                   "losses": list(self.losses), "state": _flatten({k: _state_of(v) for k, v in self.state.items()},
                                                                 tensors),
                   "rng": _flatten(_rng_state(self.session.generator), tensors)}
        with atomic_file(self.path) as tmp:
            save_file(tensors, str(tmp), metadata={_META: json.dumps(payload)})

    def _restore(self, key: str) -> None:
        from safetensors import safe_open

        with safe_open(str(self.path), "pt") as f:
            payload = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if payload["name"] != self.name or payload["total"] != self.total:
            raise InputError(f"{self.path} is the checkpoint of loop {payload['name']!r} ({payload['total']} "
                             f"iterations), not of {self.name!r} ({self.total}): delete {self.session.directory} "
                             "to start over")
        state = _unflatten(payload["state"], tensors)
        if set(state) != set(self.state):
            raise InputError(f"{self.path} holds {sorted(state)}, not {sorted(self.state)}: delete "
                             f"{self.session.directory} to start over")
        for k, target in self.state.items():
            _load_into(target, state[k])
        _set_rng_state(self.session.generator, _unflatten(payload["rng"], tensors))
        self.start, self.losses, self.done = payload["iteration"], list(payload["losses"]), payload["done"]
        self.session.resumed[key] = self.start
        if self.done:
            log.info("%s: finished in an earlier run; its state is restored from %s", self.name, self.path)
        else:
            log.info("%s: resuming at iteration %d of %d from %s", self.name, self.start, self.total, self.path)


def resumable(name: str, total: int, state: dict[str, Any]) -> Loop:
    """The checkpoint of the next loop (``total`` iterations) of the open :func:`checkpointing`
    block, restored if an earlier run wrote it. ``state``: name -> what the loop changes, each an
    object with ``state_dict`` / ``load_state_dict`` (a module, an optimizer), a dict (its values:
    tensors, numbers, lists, None) or a list of tensors (parameters, restored in place)."""
    return Loop(_ACTIVE.get(), name, total, state)


def _state_of(target) -> Any:
    if hasattr(target, "state_dict"):
        return target.state_dict()
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in target):
        return [t.detach() for t in target]
    raise TypeError(f"cannot checkpoint a {type(target).__name__}: register a module, an optimizer, a dict or a "
                    "list of tensors")


@torch.no_grad()
def _load_into(target, value) -> None:
    if hasattr(target, "load_state_dict"):
        target.load_state_dict(value)
    elif isinstance(target, dict):
        target.clear()
        target.update(value)
    else:
        for t, v in zip(target, value, strict=True):
            t.copy_(v)


def _rng_state(generator: torch.Generator | None) -> dict:
    state = {"torch": torch.get_rng_state()}
    if generator is not None:
        state["generator"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator | None, state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if generator is not None:
        generator.set_state(state["generator"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _flatten(obj, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON, its tensors moved into ``tensors`` (by reference key, with their device);
    dicts keep their key types and tuples stay tuples (optimizer state dicts round-trip exactly)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key, "device": str(obj.device)}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].to(obj["device"])
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj
