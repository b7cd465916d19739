"""Optimisers and learning-rate schedules for tfm modules (paper, section 5.3).

    Adam(module, lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0)
        torch.optim.Adam's update, with the paper's betas and eps as defaults; its moment
        estimates live on the module's backend beside the weights.
    noam(d_model, warmup_steps=4000)
        lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5): a linear warm-up,
        then decay with the inverse square root of the step (section 5.3).

``lr`` is a number or a schedule: any callable from the step number (1, 2, ...) to a
learning rate. A model trains with ``model.train_step(optimizer, src_ids, tgt_ids)``; any
module can be trained with gradients from ``tfm.vjp``: ``optimizer.step(param_grads)``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ._checks import check_int
from .layers.module import Module

__all__ = ["Adam", "Noam", "noam"]


class Noam:
    """The learning rate of section 5.3 at a given step (a callable; see :func:`noam`)."""

    def __init__(self, d_model: int, warmup_steps: int = 4000):
        self.d_model = check_int("d_model", d_model)
        self.warmup_steps = check_int("warmup_steps", warmup_steps)

    def __call__(self, step: int) -> float:
        step = check_int("step", step)
        return self.d_model ** -0.5 * min(step ** -0.5, step * self.warmup_steps ** -1.5)

    def __repr__(self) -> str:
        return f"noam(d_model={self.d_model}, warmup_steps={self.warmup_steps})"


def noam(d_model: int, warmup_steps: int = 4000) -> Noam:
    """lrate(step) = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), step = 1, 2, ...

    It rises linearly for ``warmup_steps`` steps to d_model^-0.5 * warmup_steps^-0.5, then
    decays as step^-0.5 (the paper: d_model = 512, warmup_steps = 4000).
    """
    return Noam(d_model, warmup_steps)


def _check_lr(lr, step: int | None = None) -> float:
    where = "" if step is None else f" at step {step}"
    if isinstance(lr, (bool, np.bool_)) or not isinstance(lr, (int, float, np.floating)):
        raise TypeError(f"the learning rate{where} must be a number, got {type(lr).__name__}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the learning rate{where} must be a finite number > 0, got {lr!r}")
    return float(lr)


class Adam:
    """Adam (Kingma & Ba, 2015) as ``torch.optim.Adam``: the same update from the same state.

    For each parameter, at step t with g = grad + weight_decay * param (L2, as torch's
    ``weight_decay``; not AdamW): m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    param -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).

    ``module``: any tfm module on any backend (a model or a layer); the moments are zeros
    on its backend. ``lr``: a number > 0 or a schedule ``lr(step) -> number`` such as
    :func:`noam`. Defaults: the paper's beta1 = 0.9, beta2 = 0.98, eps = 1e-9.
    """

    def __init__(self, module: Module, lr: float | Callable[[int], float], betas=(0.9, 0.98), eps: float = 1e-9,
                 weight_decay: float = 0.0):
        if not isinstance(module, Module):
            raise TypeError(f"Adam optimises a tfm module (a layer or a model), got {type(module).__name__}")
        if module.backend is None:
            raise ValueError(f"the {type(module).__name__} has no backend yet (built with backend=None)")
        self._lr = lr if callable(lr) else _check_lr(lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for name, b in zip(("beta1", "beta2"), betas):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {b!r}")
        for name, value in (("eps", eps), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        self.module = module
        self.betas, self.eps, self.weight_decay = (float(betas[0]), float(betas[1])), float(eps), float(weight_decay)
        self.steps = 0  # updates made so far
        self._backend = bk = module.backend
        slots = module._all_slots()
        self._m = {name: bk.zeros(a.shape, module.dtype) for name, a in slots.items()}
        self._v = {name: bk.zeros(a.shape, module.dtype) for name, a in slots.items()}

    def lr_at(self, step: int) -> float:
        """The learning rate of update number ``step`` (1, 2, ...)."""
        return _check_lr(self._lr(step), step) if callable(self._lr) else self._lr

    def step(self, grads: dict) -> None:
        """One update from gradients by parameter name (``tfm.vjp``'s or ``loss_and_grad``'s
        parameter gradients: one for every parameter, shaped like it)."""
        module = self.module
        params = module.params
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        if missing or extra:
            raise ValueError(f"grads must hold one gradient for every parameter of the "
                             f"{type(module).__name__}: missing {missing}, unexpected {extra}")
        for name, p in params.items():
            if tuple(np.shape(grads[name])) != p.shape:
                raise ValueError(f"the gradient of {name!r} has shape {tuple(np.shape(grads[name]))}, "
                                 f"the parameter {p.shape}")
        bk, slot_grads = self._backend, {}
        for prefix, m in module._named_modules():
            own = {k: bk.to_numpy(grads[prefix + k]) for k in m._params}
            for k, g in m._slots_from_params(own).items():
                slot_grads[prefix + k] = bk.asarray(g, m.dtype)
        self._apply(slot_grads)

    def _check_backend(self) -> None:
        """The moments live on the backend the module had when this optimizer was made."""
        module, bk = self.module, self._backend
        if module.backend is not bk:
            raise ValueError(f"the {type(module).__name__} moved from backend {bk.name!r} to "
                             f"{module.backend.name!r} after this optimizer was made; make a new one")

    def _apply(self, grads: dict) -> None:
        """The update from gradients by slot name (backend arrays, as backward returns them)."""
        self._check_backend()
        module, bk = self.module, self._backend
        slots = module._all_slots()
        step = self.steps + 1
        lr = self.lr_at(step)
        for name, p in slots.items():
            bk.adam_step(p, grads[name], self._m[name], self._v[name], step, lr, *self.betas, self.eps,
                         self.weight_decay)
        self.steps = step
        for m in module.modules():
            m._stale = True  # the host params are read back when next asked for
            m._refresh()

    def __repr__(self) -> str:
        lr = self._lr if callable(self._lr) else f"{self._lr:g}"
        return (f"Adam({type(self.module).__name__}, lr={lr}, betas={self.betas}, eps={self.eps:g}, "
                f"weight_decay={self.weight_decay:g}, steps={self.steps})")
