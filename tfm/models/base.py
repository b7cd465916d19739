"""``Model``: the plumbing every tfm model shares (parameters, backends, save/load).

A model is a validated config plus a flat dict of named host parameters. Subclasses
declare their parameters once, in ``_param_specs()``; this base class then

* initialises them deterministically from ``seed`` (one ``np.random.default_rng(seed)``
  stream, drawn in declaration order) in the config's dtype,
* uploads them once to the backend (``model.backend = "cuda"`` re-uploads; activations
  never leave the backend except through ``backend.to_numpy``),
* saves them to one ``.npz`` file together with the config as JSON, and loads them back
  bit for bit (``Model.load(path, backend=...)``), checking names and shapes.

``greedy`` is the decoding loop (eos handling, early stop) every model's ``generate`` runs.

Writing a model::

    class MyModel(Model):
        config_class = MyConfig                     # a dataclass with to_dict/from_dict, .dtype

        def _param_specs(self):
            d = self.config.d_model
            return {"proj.weight": ((d, d), xavier_uniform), "proj.bias": ((d,), zeros)}

        def forward(self, x):
            bk, w = self.backend, self.weights      # backend object, dict of backend arrays
            return bk.to_numpy(bk.linear(bk.asarray(x, self.dtype), w["proj.weight"], w["proj.bias"]))

An initialiser is any ``init(rng, shape) -> float64 ndarray``; ``xavier_uniform``,
``uniform(bound)``, ``normal(std)``, ``zeros`` and ``ones`` are provided. Override
``_device_params(params)`` to upload derived arrays too (e.g. slices of a fused weight).
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable

import numpy as np

from ..backends import Backend, get_backend

Init = Callable[[np.random.Generator, tuple], np.ndarray]

# Bumped when the file layout changes; load() refuses files it does not understand.
FORMAT_VERSION = 1


# ---------------------------------------------------------------------- decoding
def greedy(batch: int, max_new_tokens: int, bos_id: int, eos_id, next_tokens) -> np.ndarray:
    """Greedy loop shared by every model: ``next_tokens(out, t)`` -> (B,) host ids for step t.

    Sequences that emitted ``eos_id`` keep emitting it; stops once all have.
    """
    out = np.full((batch, 1 + max_new_tokens), bos_id, dtype=np.int64)
    done = np.zeros(batch, dtype=bool)
    for t in range(max_new_tokens):
        nxt = next_tokens(out, t)
        if eos_id is not None:
            nxt[done] = eos_id
            done |= nxt == eos_id
        out[:, t + 1] = nxt
        if eos_id is not None and done.all():
            return out[:, :t + 2]
    return out


# ---------------------------------------------------------------------- initialisers
def xavier_uniform(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Glorot & Bengio (2010): U(-a, a), a = sqrt(6 / (fan_in + fan_out)).

    ``shape`` is PyTorch's (out, in[, k]) layout: fan_in = in * k, fan_out = out * k, as
    ``torch.nn.init.xavier_uniform_`` (which nn.Transformer applies to its matrices).
    """
    if len(shape) < 2:
        raise ValueError(f"xavier_uniform needs a matrix shape, got {shape}")
    receptive = math.prod(shape[2:])
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape)


def uniform(bound: float) -> Init:
    """U(-bound, bound), e.g. PyTorch's recurrent default bound = 1/sqrt(hidden)."""
    return lambda rng, shape: rng.uniform(-bound, bound, size=shape)


def normal(std: float) -> Init:
    """N(0, std^2), e.g. embeddings with std = d_model**-0.5."""
    return lambda rng, shape: rng.normal(0.0, std, size=shape)


def zeros(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return np.zeros(shape)


def ones(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    return np.ones(shape)


# ---------------------------------------------------------------------- the base class
class Model:
    """Config + named parameters + a backend. See the module docstring for the contract.

    Attributes: ``config``; ``dtype`` (np.dtype of ``config.dtype``); ``params`` (host
    NumPy arrays, the source of truth that ``save`` writes); ``weights`` (the same
    parameters as backend arrays, plus whatever ``_device_params`` derives); ``backend``
    (a :class:`tfm.backends.Backend`; assign a name or instance to move the model).
    """

    config_class: type = None  # set by subclasses

    def __init__(self, config, seed: int = 0, backend="cpu"):
        self.config = self._check_config(config)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        rng = np.random.default_rng(int(seed))
        self.params = {name: init(rng, tuple(shape)).astype(self.dtype)
                       for name, (shape, init) in self._param_specs().items()}
        self._backend = None
        self.backend = backend

    # --------------------------------------------------------------- subclass hooks
    def _param_specs(self) -> dict[str, tuple[tuple, Init]]:
        """``{name: (shape, init)}`` in initialisation order."""
        raise NotImplementedError

    def _device_params(self, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays to upload (default: the parameters themselves)."""
        return params

    # --------------------------------------------------------------- config, dtype
    @classmethod
    def _check_config(cls, config):
        if not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} needs a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        return config

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.config.dtype)

    @property
    def n_params(self) -> int:
        """Number of scalar parameters (tied weights counted once)."""
        return sum(p.size for p in self.params.values())

    # --------------------------------------------------------------- backend
    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        bk = get_backend(backend)  # ValueError naming the choices for an unknown name
        self.weights = {name: bk.asarray(np.ascontiguousarray(a), self.dtype)
                        for name, a in self._device_params(self.params).items()}
        self._backend = bk

    def to(self, backend) -> "Model":
        """Move the parameters to ``backend`` (a name or Backend); returns self."""
        self.backend = backend
        return self

    # --------------------------------------------------------------- save / load
    def save(self, path) -> str:
        """Write config (JSON) and parameters to an ``.npz`` file; returns the path written.

        NumPy appends ``.npz`` when ``path`` lacks it. Parameters are stored in the
        config dtype, so ``load`` reproduces the model bit for bit.
        """
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        np.savez(path, __model__=np.array(type(self).__name__),
                 __format__=np.array(FORMAT_VERSION),
                 __config__=np.array(json.dumps(self.config.to_dict())), **self.params)
        return path

    @classmethod
    def load(cls, path, backend="cpu"):
        """Rebuild a model saved by ``save`` (no pickle; names and shapes are checked)."""
        with np.load(os.fspath(path), allow_pickle=False) as f:
            meta = {k: f[k] for k in ("__model__", "__format__", "__config__") if k in f.files}
            if len(meta) != 3:
                raise ValueError(f"{path} is not a tfm model file (missing metadata)")
            if str(meta["__model__"]) != cls.__name__:
                raise ValueError(f"{path} holds a {meta['__model__']}, not a {cls.__name__}")
            if int(meta["__format__"]) != FORMAT_VERSION:
                raise ValueError(f"{path} has file format {int(meta['__format__'])}; "
                                 f"this tfm reads format {FORMAT_VERSION}")
            params = {k: f[k] for k in f.files if k not in meta}
        config = cls.config_class.from_dict(json.loads(str(meta["__config__"])))
        return cls.from_params(config, params, backend=backend)

    @classmethod
    def from_params(cls, config, params: dict, backend="cpu"):
        """A model with the given host parameters (names and shapes must match the specs)."""
        self = cls.__new__(cls)
        self.config = cls._check_config(config)
        specs = self._param_specs()
        missing, extra = sorted(set(specs) - set(params)), sorted(set(params) - set(specs))
        if missing or extra:
            raise ValueError(f"parameters do not match {cls.__name__}: missing {missing}, "
                             f"unexpected {extra}")
        for name, (shape, _) in specs.items():
            if tuple(np.shape(params[name])) != tuple(shape):
                raise ValueError(f"parameter {name!r} has shape {np.shape(params[name])}, "
                                 f"expected {tuple(shape)}")
        self.params = {name: np.array(params[name], dtype=self.dtype) for name in specs}
        self._backend = None
        self.backend = backend
        return self

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.config!r}, backend={self.backend.name!r}, "
                f"n_params={self.n_params:,})")
