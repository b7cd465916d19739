"""Input validation shared by the public API: clear errors that name the problem."""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
IMPLS = ("naive", "fused")


def is_device_array(x) -> bool:
    if getattr(x, "__cuda_ndarray__", False):  # numba device arrays, also the CUDA simulator's
        return True
    return hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray)


def as_array(name: str, x):
    """np.asarray for host data; device arrays (``__cuda_array_interface__``) pass through."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if is_device_array(x):
        if not getattr(x, "__cuda_ndarray__", False):  # CuPy, PyTorch: zero-copy numba view
            from numba import cuda  # (its dtype is a NumPy dtype, unlike torch's)

            x = cuda.as_cuda_array(x)
        return x
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to an array: {exc}") from None


def check_float(name: str, x, ndim: int | None = None):
    x = as_array(name, x)
    dtype = np.dtype(x.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {dtype}")
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if 0 in tuple(x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_dtype(dtype) -> np.dtype:
    """A layer's dtype: float32 or float64 (a name, np.dtype or NumPy type)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def check_int(name: str, value, minimum: int = 1) -> int:
    """An integer (not a bool) >= minimum."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_dropout(p) -> float:
    """A dropout probability in [0, 1) (1 would drop everything)."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_label_smoothing(eps) -> float:
    """PyTorch's label_smoothing: a number in [0, 1]."""
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating)) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {eps!r}")
    return float(eps)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_features(name: str, x, ndim: int, features: int, what: str):
    """A float array of ``ndim`` dimensions whose last one has ``features`` entries (the
    layer's ``what``, e.g. d_model); host arrays and device arrays alike."""
    x = check_float(name, x, ndim)
    if x.shape[-1] != features:
        raise ValueError(f"{name} must have {what}={features} features in its last dimension, "
                         f"got shape {tuple(x.shape)}")
    return x


def check_same_batch(names: str, *arrays) -> None:
    """Arrays that pair up row by row; ``names`` reads "src and tgt" in the message."""
    sizes = [a.shape[0] for a in arrays]
    if len(set(sizes)) > 1:
        raise ValueError(f"{names} batch sizes differ: {' != '.join(map(str, sizes))}")


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


def check_attention_inputs(q, k, v, mask=None):
    """Validate (B, H, Nq, Dk), (B, H, Nk, Dk), (B, H, Nk, Dv) and a bool mask; returns them."""
    q = check_float("q", q, 4)
    k = check_float("k", k, 4)
    v = check_float("v", v, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, h, nq, dk), (bk, hk, nk, dk2), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if (b, h) != (bk, hk) or (b, h) != (bv, hv):
        raise ValueError(
            f"q, k, v must share batch and head dims (B, H): got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if dk != dk2:
        raise ValueError(f"q and k head dims differ: q has Dk={dk}, k has Dk={dk2}")
    if nk != nv:
        raise ValueError(f"k and v must have the same length: k has Nk={nk}, v has Nk={nv}")
    if mask is not None:
        mask = as_array("mask", mask)
        if np.dtype(mask.dtype) != np.bool_:
            raise TypeError(f"mask must be boolean (True = may attend), got dtype {mask.dtype}")
        if len(mask.shape) > 4:
            raise ValueError(f"mask must have at most 4 dimensions, got shape {tuple(mask.shape)}")
        target = (b, h, nq, nk)
        padded = (1,) * (4 - len(mask.shape)) + tuple(mask.shape)
        if any(m not in (1, t) for m, t in zip(padded, target)):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} is not broadcastable to (B, H, Nq, Nk) = {target}"
            )
    return q, k, v, mask


def check_token_ids(name: str, ids, vocab: int, max_len: int | None = None) -> np.ndarray:
    """Token ids: a (B, N) integer array with 0 <= id < vocab and N <= max_len."""
    ids = np.asarray(ids)
    if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of token ids, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise ValueError(f"{name} must have shape (batch, length), got shape {ids.shape}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must not be empty, got shape {ids.shape}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad} outside the vocabulary [0, {vocab})")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(
            f"{name} has length {ids.shape[1]}, longer than the model's max_len={max_len}"
        )
    return ids.astype(np.int64, copy=False)


def check_generation_args(max_new_tokens, bos_id, eos_id, tgt_vocab: int, max_len: int) -> None:
    """Greedy-decoding arguments shared by every model's ``generate``."""
    for name, value in (("max_new_tokens", max_new_tokens), ("bos_id", bos_id)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer)) or isinstance(eos_id, bool)):
        raise TypeError(f"eos_id must be an integer or None, got {type(eos_id).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if 1 + max_new_tokens > max_len:
        raise ValueError(f"1 (bos) + max_new_tokens={max_new_tokens} exceeds the model's "
                         f"max_len={max_len}")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is not None and not 0 <= value < tgt_vocab:
            raise ValueError(f"{name}={value} is outside the target vocabulary [0, {tgt_vocab})")


def check_padding_mask(name: str, mask, batch: int, length: int) -> np.ndarray | None:
    """A (B, N) bool key-padding mask, True = padding (PyTorch's key_padding_mask)."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must be boolean (True = padding), got dtype {mask.dtype}")
    if mask.shape != (batch, length):
        raise ValueError(f"{name} must have shape {(batch, length)}, got {mask.shape}")
    return mask


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
