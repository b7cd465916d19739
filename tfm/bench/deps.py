"""Dependency structure of real layers, measured by perturbation, and path lengths by BFS.

``one_hop(apply, n, d)`` measures which output positions of one layer application change
when input position i changes: a batch holds the unperturbed input and copies with one
position perturbed (+1 in every channel), run through the actual kernel in float64;
output j "depends on" input i when it moves by more than 1e-9 of the output's scale.
Up to ``exhaustive_max`` positions every position is perturbed (in chunks); above it,
positions near both borders and a spread of interior ones are, the interior patterns
are checked to be one translation-invariant offset set, the border ones to be that set
clipped at the sequence ends, and the full relation is completed from the verified
pattern (anything else raises: no silent extrapolation).

A stack of layers is a sequence of such relations; the path length from input i to
output j is the fewest layer applications whose composed relation links them (a breadth-
first search; all our relations contain i -> i, so shorter paths extend to any depth).
The unrolled recurrence is measured the same way at the level of a cell step (one hop):
``recurrent_structure`` checks on the real kernel that the cell's output depends on both
x_t and h_{t-1}, and that the layer equals n chained single-step calls.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..backends import get_backend
from ..layers import conv_padding

REL_TOL = 1e-9
CHUNK = 64


def _changed(apply: Callable[[np.ndarray], np.ndarray], base: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """(len(positions), n_out) bool: outputs moved by perturbing each input position."""
    rows = []
    for start in range(0, len(positions), CHUNK):
        chunk = positions[start:start + CHUNK]
        x = np.repeat(base, len(chunk) + 1, axis=0)  # (1 + P, n, d)
        for m, p in enumerate(chunk):
            x[1 + m, p, :] += 1.0
        y = np.asarray(apply(x), dtype=np.float64)  # (1 + P, n_out, d_out)
        if not np.all(np.isfinite(y)):
            raise FloatingPointError("layer output has NaN/inf during perturbation")
        scale = max(1.0, float(np.abs(y[0]).max()))
        diff = np.abs(y[1:] - y[:1]).max(axis=2)  # (P, n_out)
        rows.append(diff > REL_TOL * scale)
    return np.concatenate(rows, axis=0)


def one_hop(apply: Callable[[np.ndarray], np.ndarray], n: int, d: int, *, seed: int = 0,
            exhaustive_max: int = 256, margin: int = 48, interior: int = 16) -> tuple[np.ndarray, str]:
    """(n, n_out) bool relation R[i, j] = output j depends on input i, and how it was measured.

    ``margin`` must cover the layer's dependency span (e.g. dilation * (k - 1) for a
    convolution); a smaller one makes the translation-invariance check fail, never pass.
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, n, d))
    if n <= exhaustive_max or 2 * margin + interior >= n:
        return _changed(apply, base, list(range(n))), f"all {n} positions perturbed"
    border = sorted(set(range(min(margin, n))) | set(range(max(0, n - margin), n)))
    inner = [int(p) for p in np.linspace(margin, n - margin - 1, interior).round()]
    probes = sorted(set(border) | set(inner))
    got = dict(zip(probes, _changed(apply, base, probes)))
    n_out = next(iter(got.values())).size
    full = np.ones((n, n_out), dtype=bool)
    for name, rel in (("every output", full), ("every output j >= i", np.triu(full))):
        if all(np.array_equal(got[p], rel[p]) for p in probes):  # global (attention-like) patterns
            return rel, f"{len(probes)} of {n} positions perturbed; each reached {name}"
    offsets = [frozenset(np.flatnonzero(got[p]) - p) for p in inner]
    if len(set(offsets)) != 1:
        raise ValueError("interior dependency patterns differ: the layer is not translation invariant")
    pattern = np.array(sorted(offsets[0]))
    if pattern.size == 0 or pattern.min() < -margin or pattern.max() > margin:
        raise ValueError(f"dependency span exceeds the probed margin of {margin} positions")
    rel = np.zeros((n, n_out), dtype=bool)
    for i in range(n):
        j = i + pattern
        rel[i, j[(j >= 0) & (j < n_out)]] = True
    for p in probes:
        if not np.array_equal(rel[p], got[p]):
            raise ValueError(f"measured pattern at position {p} is not the interior pattern clipped at the borders")
    return rel, (f"{len(probes)} of {n} positions perturbed ({len(border)} at the borders, {len(inner)} interior); "
                 f"translation invariance verified, offsets {pattern.min()}..{pattern.max()}")


def stack_path_lengths(relations: Callable[[int], np.ndarray] | np.ndarray, max_layers: int) -> np.ndarray:
    """(n, n) hop counts through a stack (np.inf: not linked within ``max_layers``).

    ``relations`` is one (n, n) relation for a stack of identical layers, or a function
    giving layer l's relation (l = 0, 1, ...).
    """
    from scipy import sparse
    from scipy.sparse import csgraph

    if isinstance(relations, np.ndarray) and relations.sum() <= 64 * relations.shape[0]:
        # identical sparse layers: breadth-first search from every input position
        g = sparse.csr_matrix(relations.astype(np.float64))
        dist = csgraph.shortest_path(g, method="D", unweighted=True, directed=True)
        # a path i -> i is one layer application, not zero: 1 + min over predecessors m of i
        diag = 1.0 + np.min(np.where(relations.T, dist, np.inf), axis=1)
        dist[np.arange(dist.shape[0]), np.arange(dist.shape[0])] = diag
        dist[dist > max_layers] = np.inf
        return dist
    layer = (lambda _l: relations) if isinstance(relations, np.ndarray) else relations
    n = layer(0).shape[0]
    dist = np.full((n, n), np.inf)
    reach = np.eye(n, dtype=np.float32)
    for depth in range(1, max_layers + 1):
        r = sparse.csr_matrix(layer(depth - 1).astype(np.float32))
        reach = (np.asarray(r.T @ reach.T).T > 0).astype(np.float32)  # dense @ sparse
        new = (reach > 0) & np.isinf(dist)
        dist[new] = depth
        if np.isfinite(dist).all() or (not new.any() and isinstance(relations, np.ndarray)):
            break  # identical layers: nothing new now means nothing new ever
    return dist


def max_path(dist: np.ndarray, causal: bool) -> float:
    """Maximum over the pairs that must be linked (i <= j when causal) of the hop count."""
    n = dist.shape[0]
    pairs = np.triu(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    return float(dist[pairs].max())


# --------------------------------------------------------------------- the real layers
def apply_fn(layer: str, *, d: int, backend="cpu", k: int = 3, dilation: int = 1, window: int = 8,
             causal: bool = False, seed: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """x (B, n, d) float64 -> layer(x) through ``backend`` (weights drawn once)."""
    bk = get_backend(backend)
    rng = np.random.default_rng(seed)
    f64 = np.float64

    def to(a):
        return bk.asarray(np.ascontiguousarray(a, dtype=f64), f64)

    if layer in ("self_attention", "self_attention_restricted"):
        def apply(x):
            q = to(x[:, None])  # (B, 1, n, d): one head; projections are per position
            if layer == "self_attention":
                out = bk.attention(q, q, q, None, causal, "fused")
            else:
                out = bk.restricted_attention(q, q, q, window, causal)
            return bk.to_numpy(out)[:, 0]
        return apply
    if layer in ("convolutional", "convolutional_dilated"):
        w = rng.standard_normal((d, d, k)) / np.sqrt(d * k)
        bias = rng.standard_normal(d) * 0.1
        left, right = conv_padding("causal" if causal else "same", k, dilation)
        wd, bd = to(w), to(bias)
        return lambda x: bk.to_numpy(bk.conv1d(to(x), wd, bd, dilation, left, right))
    if layer == "recurrent":
        w_ih, w_hh = to(rng.standard_normal((4 * d, d)) / np.sqrt(d)), to(rng.standard_normal((4 * d, d)) / np.sqrt(d))
        bias = rng.standard_normal(4 * d) * 0.1
        # Forget gate saturated open (bias 30) and input gate nearly shut (bias -5): a
        # perturbation of x_i then survives every later step above float64 rounding,
        # instead of decaying geometrically below the detection threshold.
        bias[:d] -= 5.0
        bias[d:2 * d] += 30.0
        b_ih, b_hh = to(bias), to(rng.standard_normal(4 * d) * 0.1)

        def apply(x, h0=None, c0=None, full=False):
            b = x.shape[0]
            h0 = np.zeros((b, d)) if h0 is None else h0
            c0 = np.zeros((b, d)) if c0 is None else c0
            out, h, c = bk.lstm_layer(to(x), to(h0), to(c0), w_ih, w_hh, b_ih, b_hh)
            res = bk.to_numpy(out)
            return (res, bk.to_numpy(h), bk.to_numpy(c)) if full else res
        return apply
    raise ValueError(f"unknown layer {layer!r}")


def recurrent_structure(apply, n: int, d: int, seed: int = 0) -> dict:
    """Measure the unrolled recurrence of an LSTM layer on the real kernel.

    Returns the facts the path-length and sequential-operation counts rest on: the cell
    output depends on x_t and on h_{t-1}; the layer over n steps equals n chained calls
    of one step (so its work is n dependent steps); input i reaches exactly outputs j >= i.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, n, d))
    h0, c0 = rng.standard_normal((1, d)) * 0.5, rng.standard_normal((1, d)) * 0.5
    y0 = apply(x[:, :1], h0, c0)
    dep_x = bool(np.abs(apply(x[:, :1] + 1.0, h0, c0) - y0).max() > REL_TOL)
    dep_h = bool(np.abs(apply(x[:, :1], h0 + 1.0, c0) - y0).max() > REL_TOL)
    full = apply(x, h0, c0)
    h, c, steps = h0, c0, []
    for t in range(n):  # n dependent single-step calls: each needs the previous state
        out, h, c = apply(x[:, t:t + 1], h, c, full=True)
        steps.append(out)
    chained = np.concatenate(steps, axis=1)
    chain_err = float(np.abs(chained - full).max() / max(1.0, np.abs(full).max()))
    rel, how = one_hop(apply, n, d, seed=seed)
    causal_ok = bool(np.array_equal(rel, np.triu(np.ones((n, n), dtype=bool))))
    return {"cell_depends_on_x": dep_x, "cell_depends_on_h": dep_h, "chain_rel_err": chain_err,
            "chain_steps": n, "input_reaches_later_outputs": causal_ok, "how": how}


def unrolled_path_lengths(n: int) -> np.ndarray:
    """(n, n) hops from input x_i to output h_j in the unrolled recurrence (cell step = hop).

    Graph: x_t -> h_t and h_{t-1} -> h_t (what ``recurrent_structure`` measures); BFS.
    """
    from scipy import sparse
    from scipy.sparse import csgraph

    # nodes 0..n-1 are x_t, n..2n-1 are h_t
    src = np.concatenate([np.arange(n), n + np.arange(n - 1)])
    dst = np.concatenate([n + np.arange(n), n + np.arange(1, n)])
    g = sparse.csr_matrix((np.ones(src.size), (src, dst)), shape=(2 * n, 2 * n))
    dist = csgraph.shortest_path(g, method="D", unweighted=True, directed=True, indices=np.arange(n))
    return dist[:, n:]
