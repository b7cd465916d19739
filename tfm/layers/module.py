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
reference backend).

Training. Beside ``forward`` each module has

* ``forward_train(...) -> (out, saved)``: the same function on backend arrays, keeping in
  ``saved`` what the backward needs (and applying dropout in training mode);
* ``backward(saved, dout) -> (dinputs, grads)``: ``dinputs`` a tuple with the gradient of
  each differentiable input, ``grads`` the gradient of every parameter of the module's tree
  as backend arrays, keyed by *slot* relative to the module (below). A backward never
  writes into ``saved`` or ``dout``, so it can run twice.

A slot is a backend array an optimizer updates in place (``_slots``): by default a
module's own parameters as uploaded, under their names. A module that derives arrays at
upload picks its slots: views of a parameter need nothing (updating the parameter
updates them); a parameter uploaded as blocks (``_LuongAttention``'s column blocks) is
updated block by block, exactly, since Adam is elementwise (``_params_from_slots`` and
``_slots_from_params`` join and split the blocks on the host for the public gradients);
a parameter uploaded with a constant folded in keeps a slot of its own and rebuilds the
folded array after each update (``_refresh``). ``tfm.vjp``, ``loss_and_grad`` and
``tfm.optim.Adam`` turn slot gradients into parameter gradients with :meth:`param_grads`.

After an optimizer step the backend arrays hold the newest weights; the host
``params`` are read back from them when next asked for (``params``, ``save``, a move to
another backend).

Dropout (``train()`` / ``eval()``): in training mode, ``forward_train`` drops elements with
the backend's counter-based ``dropout``; every module of a tree draws from one
:class:`DropoutStream` (seed, offset) that advances by the size of each mask, so the
same seed and the same calls drop the same elements on every backend. ``forward`` (the
inference path) never drops.

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

from .._checks import check_dropout, check_dtype
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


def scaled(bk: Backend, a, top: float, bottom: float | None = None):
    """A new backend array: ``top * a``, or with ``bottom`` the first half of a's rows times
    ``top`` and the second half times ``bottom`` (the backend has no scalar multiply: zeros,
    then accumulate). Folds constants into weights, and takes gradients back through a fold."""
    out = bk.zeros(a.shape, a.dtype)
    if bottom is None:
        bk.axpy(out, a, top)
    else:
        half = a.shape[0] // 2
        bk.axpy(out[:half], a[:half], top)
        bk.axpy(out[half:], a[half:], bottom)
    return out


# ---------------------------------------------------------------------- dropout
class DropoutStream:
    """Where the next dropout mask starts in the backends' counter-based stream.

    Element i of a mask drawn at ``offset`` uses the counter ``offset + i`` of ``seed``, and
    each mask advances the offset by its size, so masks never share counters and a run
    with the same seed and the same calls drops the same elements on every backend.
    """

    def __init__(self, seed: int = 0):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0:
            raise ValueError(f"a dropout seed must be an integer >= 0, got {seed!r}")
        self.seed, self.offset = int(seed), 0

    def take(self, n: int) -> int:
        """The offset of a mask of ``n`` elements (the counters after it come next)."""
        start, self.offset = self.offset, self.offset + int(n)
        return start

    def __repr__(self) -> str:
        return f"DropoutStream(seed={self.seed}, offset={self.offset})"


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
        self.training = True  # as PyTorch's modules; only dropout reads it
        self._stream = DropoutStream()  # the tree's root shares its own with every module
        self._stale = False  # the backend slots hold newer weights than ``_params``

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
        self._share_stream(self._stream)  # one dropout stream per tree: the outermost _build's
        if backend is None:
            return
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
        bk = get_backend(backend)  # ValueError naming the choices, before any work
        rng = np.random.default_rng(int(seed))
        for name, module, local, (shape, init) in self._walk():
            module._params[local] = self._init_rule(name, shape, init)(rng, shape).astype(self.dtype)
        self._share_stream(DropoutStream(int(seed)))
        self.backend = bk

    # --------------------------------------------------------------- subclass hooks
    def _init_rule(self, name: str, shape: tuple, init: Init) -> Init:
        """The initialiser the root uses for parameter ``name`` (default: as declared)."""
        return init

    def _device_params(self, bk: Backend) -> dict:
        """This module's backend arrays (default: its own parameters, uploaded). Override to
        derive arrays too, e.g. views of a fused weight or weights with constants folded in."""
        return upload(bk, self._params, self.dtype)

    def _slots(self) -> dict:
        """This module's backend arrays that an optimizer updates in place, by slot name
        (default: its own parameters as uploaded, under their names)."""
        return {name: self.weights[name] for name in self._params}

    def _params_from_slots(self, slots: dict) -> dict:
        """Host arrays by slot name -> host arrays by own parameter name (default: the same);
        used for gradients and for reading trained weights back."""
        return slots

    def _slots_from_params(self, params: dict) -> dict:
        """The inverse of :meth:`_params_from_slots` (default: the same)."""
        return params

    def _refresh(self) -> None:
        """Rebuild arrays derived from the slots after an optimizer updated them (default:
        none; views of a slot follow it by themselves)."""

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

    def _named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(prefix of its names, module) for this module and every submodule, parents first."""
        yield prefix, self
        for name, part in self._parts:
            if isinstance(part, Module):
                yield from part._named_modules(prefix if name is None else f"{prefix}{name}.")

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Every parameter of the tree by flat name (the arrays themselves, not copies)."""
        self._read_back()
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
        for module in self.modules():
            module._stale = False  # the new host weights are the newest
        if self._backend is not None:
            self.backend = self._backend

    # --------------------------------------------------------------- backend
    @property
    def backend(self) -> Backend:
        return self._backend

    @backend.setter
    def backend(self, backend) -> None:
        bk = get_backend(backend)  # ValueError naming the choices for an unknown name
        self._read_back()  # trained weights move with the tree
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

    # --------------------------------------------------------------- training
    def train(self, mode: bool = True, *, seed: int | None = None) -> "Module":
        """Training mode (``mode=True``, the default state) or inference mode for the whole
        tree; returns self. Only dropout differs: it acts in the training computations
        (``tfm.vjp``, ``loss``, ``loss_and_grad``, ``train_step``) in training mode. ``seed``
        restarts the tree's dropout stream (by default it is the construction seed)."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        for module in self.modules():
            module.training = bool(mode)
        if seed is not None:
            self._share_stream(DropoutStream(seed))
        return self

    def eval(self) -> "Module":
        """Inference mode (no dropout anywhere in the tree); returns self."""
        return self.train(False)

    def _share_stream(self, stream: DropoutStream) -> None:
        for module in self.modules():
            module._stream = stream

    def _dropout(self, x, p: float):
        """Training-mode dropout of x with probability p -> (y, key for the backward)."""
        if p == 0.0 or not self.training:
            return x, None
        key = (self._stream.seed, self._stream.take(x.size))
        return self._backend.dropout(x, p, *key), key

    def _dropout_with(self, x, p: float, key):
        """x through the mask of an earlier :meth:`_dropout` (``key``) and its scale: that
        dropout's backward, or the same mask on another array."""
        return x if key is None else self._backend.dropout(x, p, *key)

    @staticmethod
    def _merge(grads: dict, name: str | None, sub_grads: dict) -> dict:
        """Add a submodule's gradients (its slot names) to ``grads`` under its name."""
        prefix = "" if name is None else name + "."
        for key, g in sub_grads.items():
            grads[prefix + key] = g
        return grads

    def _all_slots(self) -> dict:
        """Every slot of the tree by flat name (backend arrays an optimizer updates)."""
        return {prefix + k: a for prefix, m in self._named_modules() for k, a in m._slots().items()}

    def param_grads(self, slot_grads: dict) -> dict[str, np.ndarray]:
        """Gradients by flat slot name (backend arrays, as ``backward`` returns them) ->
        host arrays by flat parameter name, one for every parameter of the tree (zeros for a
        parameter the computation did not reach)."""
        bk, out = self._backend, {}
        for prefix, m in self._named_modules():
            slots = m._slots()
            if not slots:
                continue
            own = {}
            for k, a in slots.items():
                g = slot_grads.get(prefix + k)
                own[k] = np.zeros(a.shape, a.dtype) if g is None else bk.to_numpy(g)
            for k, g in m._params_from_slots(own).items():
                out[prefix + k] = g
        return out

    def _pullback(self, out, saved, names: tuple):
        """What a module's ``_vjp`` returns for one output: (the host output, pullback), where
        pullback(host cotangent) -> (input gradients by argument name, parameter gradients);
        ``names`` are the arguments ``backward``'s input gradients belong to, in order."""
        def pullback(cotangent):
            dinputs, grads = self.backward(saved, self._backend.asarray(cotangent, self.dtype))
            return dict(zip(names, dinputs)), self.param_grads(grads)

        return self._host(out), pullback

    def _read_back(self) -> None:
        """Copy weights an optimizer updated on the backend into the host ``params``."""
        for m in self.modules():
            if m._stale:
                slots = {k: m._backend.to_numpy(a) for k, a in m._slots().items()}
                for k, a in m._params_from_slots(slots).items():
                    m._params[k] = np.array(a, dtype=m.dtype, order="C")
                m._stale = False

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
