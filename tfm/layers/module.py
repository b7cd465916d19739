"""``Module``: the plumbing every tfm layer and model shares (parameters, backend, dtype,
save/load).

A module declares its own parameters (``param``) and its submodules (``add``) in its
constructor, in order; together they form a tree whose parameters are addressed by flat,
dotted names, PyTorch's state-dict names: a ``MultiHeadAttention`` added as ``self_attn``
to the first layer of an ``Encoder`` added as ``encoder`` owns
``encoder.layers.0.self_attn.in_proj_weight``. A submodule added under the name ``None``
shares its parent's namespace (``FeedForward``'s ``linear1.weight`` sits directly in an
encoder layer, as in ``torch.nn.TransformerEncoderLayer``).

The module at the root of a tree (the one built with a backend) then

* draws every parameter of the tree from one ``np.random.default_rng(seed)`` stream, in
  declaration order, in the tree's dtype (``_init_rule`` may override an initialiser);
* uploads them once to its backend (``module.backend = "cuda"`` moves the whole tree;
  ``_device_params`` may derive arrays at upload, e.g. views of a fused weight);
* saves them to one ``.npz`` file with the arguments that rebuild the tree
  (``_config``), and loads them back bit for bit, checking names and shapes.

Submodules are built with ``backend=None``: structure only, their root fills them.

Every module computes in ``forward`` on backend arrays, without checks, so that models
compose modules at no cost beyond the backend calls. Its public ``__call__`` checks host
inputs and returns host arrays (in the backend's precision: float64 on the numpy
reference backend). A backward pass belongs beside ``forward``: each ``forward`` is a
straight line of backend calls with named intermediates (what a backward keeps), and
gradients are keyed by the names of ``params`` (a submodule's own ``params`` are the
same arrays under its local names).

Writing a layer::

    class Scale(Module):
        def __init__(self, d, *, seed=0, backend="cpu", dtype="float32"):
            super().__init__(dtype)
            self.d = check_int("d", d)
            self.param("weight", (d, d), xavier_uniform)
            self._build(seed, backend)

        def _config(self):
            return {"d": self.d, "dtype": self.dtype.name}

        def forward(self, x):
            return self.backend.linear(x, self.weights["weight"])

An initialiser is any ``init(rng, shape) -> float64 ndarray``; ``xavier_uniform``,
``uniform(bound)``, ``normal(std)``, ``zeros`` and ``ones`` are provided.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterator

import numpy as np

from .._checks import check_dtype
from ..backends import Backend, get_backend

__all__ = ["Module"]

Init = Callable[[np.random.Generator, tuple], np.ndarray]

# Bumped when the file layout changes; load() refuses files it does not understand.
FORMAT_VERSION = 1


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


def upload(bk: Backend, arrays: dict[str, np.ndarray], dtype) -> dict:
    """Host arrays -> backend arrays in ``dtype``, by name."""
    return {name: bk.asarray(np.ascontiguousarray(a), dtype) for name, a in arrays.items()}


# ---------------------------------------------------------------------- the base class
class Module:
    """Parameters, submodules, a backend and a dtype. See the module docstring.

    Attributes: ``dtype`` (np.dtype); ``params`` (the tree's host NumPy arrays by flat
    name: the source of truth that ``save`` writes); ``weights`` (this module's own
    parameters as backend arrays, by local name, plus what ``_device_params`` derives);
    ``backend`` (a :class:`tfm.backends.Backend`; assign a name or instance to move the
    tree).
    """

    def __init__(self, dtype="float32"):
        self.dtype = check_dtype(dtype)
        # Own parameters and submodules in declaration order: (name, (shape, init)) or
        # (name, Module); a submodule's name may be None (it shares this namespace).
        self._parts: list[tuple[str | None, object]] = []
        self._params: dict[str, np.ndarray] = {}  # own host parameters, by local name
        self.weights: dict = {}
        self._backend: Backend | None = None

    # --------------------------------------------------------------- declaring
    def param(self, name: str, shape: tuple, init: Init) -> None:
        """Declare a parameter of this module (drawn or loaded later, by the root)."""
        self._parts.append((name, (tuple(shape), init)))

    def add(self, name: str | None, module: "Module") -> "Module":
        """Register ``module`` as a submodule called ``name`` (None: no prefix); returns it."""
        if module.dtype != self.dtype:
            raise ValueError(f"a {module.dtype} {type(module).__name__} cannot be part of a "
                             f"{self.dtype} {type(self).__name__}")
        self._parts.append((name, module))
        return module

    def _build(self, seed, backend) -> None:
        """End of a constructor: draw the tree's parameters from ``seed`` and upload them to
        ``backend``; with ``backend=None`` only the structure exists (a parent or ``load``
        fills it)."""
        if backend is None:
            return
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        bk = get_backend(backend)  # ValueError naming the choices, before any work
        rng = np.random.default_rng(int(seed))
        for name, module, local, (shape, init) in self._walk():
            module._params[local] = self._init_rule(name, shape, init)(rng, shape).astype(self.dtype)
        self.backend = bk

    # --------------------------------------------------------------- subclass hooks
    def _init_rule(self, name: str, shape: tuple, init: Init) -> Init:
        """The initialiser the root uses for parameter ``name`` (default: as declared)."""
        return init

    def _device_params(self, bk: Backend) -> dict:
        """This module's backend arrays (default: its own parameters, uploaded). Override to
        derive arrays too, e.g. views of a fused weight or weights with constants folded in."""
        return upload(bk, self._params, self.dtype)

    def _config(self) -> dict:
        """JSON-able constructor arguments that rebuild this module's structure."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved on its own")

    @classmethod
    def _structure(cls, config: dict, **options) -> "Module":
        """An unfilled module (``backend=None``) from ``_config()``'s dict."""
        return cls(**config, **options, backend=None)

    # --------------------------------------------------------------- the tree
    def _walk(self, prefix: str = "") -> Iterator[tuple[str, "Module", str, tuple]]:
        """(flat name, owning module, local name, (shape, init)) for every parameter, in order."""
        for name, part in self._parts:
            if isinstance(part, Module):
                sub = prefix if name is None else f"{prefix}{name}."
                yield from part._walk(sub)
            else:
                yield prefix + name, self, name, part

    def modules(self) -> Iterator["Module"]:
        """This module and every submodule, parents first."""
        yield self
        for _, part in self._parts:
            if isinstance(part, Module):
                yield from part.modules()

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Every parameter of the tree by flat name (the arrays themselves, not copies)."""
        return {name: module._params[local] for name, module, local, _ in self._walk()}

    @property
    def n_params(self) -> int:
        """Number of scalar parameters (tied weights counted once)."""
        return sum(p.size for p in self.params.values())

    def load_state_dict(self, state: dict) -> None:
        """Replace the tree's parameters (same names and shapes; copied in this dtype) and
        upload them to the current backend."""
        specs = {name: (module, local, shape) for name, module, local, (shape, _) in self._walk()}
        missing, extra = sorted(set(specs) - set(state)), sorted(set(state) - set(specs))
        if missing or extra:
            raise ValueError(f"parameters do not match {type(self).__name__}: missing {missing}, "
                             f"unexpected {extra}")
        for name, (_, _, shape) in specs.items():
            if tuple(np.shape(state[name])) != shape:
                raise ValueError(f"parameter {name!r} has shape {np.shape(state[name])}, expected {shape}")
        for name, (module, local, _) in specs.items():
            module._params[local] = np.array(state[name], dtype=self.dtype, order="C")
        if self._backend is not None:
            self.backend = self._backend

    # --------------------------------------------------------------- backend
    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        bk = get_backend(backend)  # ValueError naming the choices for an unknown name
        for module in self.modules():
            module.weights = module._device_params(bk)
            module._backend = bk

    def to(self, backend) -> "Module":
        """Move the parameters to ``backend`` (a name or Backend); returns self."""
        self.backend = backend
        return self

    def _host(self, y) -> np.ndarray:
        """A backend result as a host array (public calls return these)."""
        return self._backend.to_numpy(y)

    # --------------------------------------------------------------- save / load
    def save(self, path) -> str:
        """Write the rebuilding arguments (JSON) and the parameters to an ``.npz`` file;
        returns the path written.

        NumPy appends ``.npz`` when ``path`` lacks it. Parameters are stored in the
        module's dtype, so ``load`` reproduces it bit for bit.
        """
        path = os.fspath(path)
        if not path.endswith(".npz"):
            path += ".npz"
        np.savez(path, __model__=np.array(type(self).__name__),
                 __format__=np.array(FORMAT_VERSION),
                 __config__=np.array(json.dumps(self._config())), **self.params)
        return path

    @classmethod
    def load(cls, path, backend="cpu", **options):
        """Rebuild a module saved by ``save`` (no pickle; names and shapes are checked).
        ``options`` are constructor options that are not saved (e.g. ``impl``)."""
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
        self = cls._structure(json.loads(str(meta["__config__"])), **options)
        self.load_state_dict(params)
        self.backend = backend
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        backend = None if self._backend is None else self._backend.name
        return f"{type(self).__name__}({args}, backend={backend!r})"
