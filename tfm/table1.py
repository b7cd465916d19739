"""Table 1 of "Attention Is All You Need" as data: the one place its claims are written.

``ROWS`` holds the paper's layer types (complexity per layer, sequential operations,
maximum path length, and the exponents of n and d its complexity implies); ``LAYERS``
every layer the studies measure, each under one name, with the kernel that runs it and
its parameters (k, r, dilation: the constants below). The studies, their plots, the
report, the CLI and the tests read these; nothing else restates them.

    name                        row                         kernel       parameters
    self_attention              self_attention              attention    fused kernel
    self_attention_naive        self_attention              attention    naive kernel
    self_attention_layer        self_attention              mha          + Q, K, V, output projections
    recurrent                   recurrent                   lstm
    rnn, gru                    recurrent                   rnn, gru
    convolutional               convolutional               conv         k = K
    convolutional_dilated       convolutional_dilated       conv         k = K, dilation = DILATION
    self_attention_restricted   self_attention_restricted   restricted   r = R
    ffn                         (not in Table 1)            ffn          d -> 4d -> d

``max_path_length(row, n, p, causal)`` gives each row's closed-form path length through a
stack of such layers (p: the row's ``path_param``, k or r), which the path-length study
compares with the lengths it measures on the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

K = 3  # convolution kernel width (Table 1's k)
R = 16  # restricted self-attention neighbourhood size (Table 1's r)
DILATION = 4  # dilation of the dilated convolution timed in the scaling study


@dataclass(frozen=True)
class Row:
    """One row of the paper's Table 1."""

    name: str
    label: str
    complexity: str  # per layer
    sequential_ops: str
    path_length: str  # maximum path length
    exponents: tuple[int, int]  # (in n, in d) of the complexity
    path_param: str = ""  # the parameter the path length depends on ("k", "r" or none)


@dataclass(frozen=True)
class Layer:
    """A layer the studies measure: its one name, label, Table 1 row and kernel parameters."""

    name: str
    label: str
    kernel: str  # the backend computation (see tfm.bench.layers.make_layer)
    row: str | None  # its Table 1 row (None: not in Table 1)
    params: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    complexity: str = ""  # only for layers outside Table 1
    own_exponents: tuple[int, int] | None = None  # only for layers outside Table 1

    @property
    def exponents(self) -> tuple[int, int]:
        """The (n, d) exponents the paper's complexity predicts for this layer's time."""
        return self.own_exponents if self.row is None else ROWS[self.row].exponents

    @property
    def paper_complexity(self) -> str:
        return self.complexity if self.row is None else ROWS[self.row].complexity


def _rows(*rows: Row) -> MappingProxyType:
    return MappingProxyType({r.name: r for r in rows})


ROWS = _rows(
    Row("self_attention", "self-attention", "O(n^2 * d)", "O(1)", "O(1)", (2, 1)),
    Row("recurrent", "recurrent", "O(n * d^2)", "O(n)", "O(n)", (1, 2)),
    Row("convolutional", "convolutional", "O(k * n * d^2)", "O(1)", "O(n/k) contiguous (O(log_k(n)) dilated)",
        (1, 2), "k"),
    Row("convolutional_dilated", "convolutional, dilated", "O(k * n * d^2)", "O(1)", "O(log_k(n))", (1, 2), "k"),
    Row("self_attention_restricted", "self-attention (restricted)", "O(r * n * d)", "O(1)", "O(n/r)", (1, 1), "r"),
)


def _layers(*layers: Layer) -> MappingProxyType:
    return MappingProxyType({lay.name: lay for lay in layers})


def _p(**kw) -> MappingProxyType:
    return MappingProxyType(kw)


LAYERS = _layers(
    Layer("self_attention", "self-attention (fused)", "attention", "self_attention", _p(impl="fused")),
    Layer("self_attention_naive", "self-attention (naive)", "attention", "self_attention", _p(impl="naive")),
    Layer("self_attention_layer", "self-attention layer (+ projections)", "mha", "self_attention"),
    Layer("recurrent", "recurrent (LSTM)", "lstm", "recurrent"),
    Layer("rnn", "recurrent (RNN)", "rnn", "recurrent"),
    Layer("gru", "recurrent (GRU)", "gru", "recurrent"),
    Layer("convolutional", f"convolutional (k={K})", "conv", "convolutional", _p(k=K, dilation=1)),
    Layer("convolutional_dilated", f"convolutional (k={K}, dilation {DILATION})", "conv", "convolutional_dilated",
          _p(k=K, dilation=DILATION)),
    Layer("self_attention_restricted", f"restricted self-attention (r={R})", "restricted",
          "self_attention_restricted", _p(window=R)),
    Layer("ffn", "position-wise FFN", "ffn", None, complexity="O(n * d^2) (not in Table 1)", own_exponents=(1, 2)),
)

# Names the tables used before this registry (results/ measured before it keeps them until the
# next `make studies`): the report reads old tables through this map.
LEGACY_NAMES = MappingProxyType({
    "attention_fused": "self_attention", "attention_naive": "self_attention_naive",
    "attention_layer": "self_attention_layer", "lstm": "recurrent", "conv": "convolutional",
    "conv_dilated": "convolutional_dilated", "restricted": "self_attention_restricted",
})


def layer(name: str) -> Layer:
    """The registry entry of a layer, with a clear error for an unknown name."""
    try:
        return LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown layer {name!r}; choose one of {', '.join(LAYERS)}") from None


def row(name: str) -> Row:
    try:
        return ROWS[name]
    except KeyError:
        raise ValueError(f"unknown Table 1 row {name!r}; choose one of {', '.join(ROWS)}") from None


def label(name: str) -> str:
    """A layer's label (a Table 1 row's label for row names that are not layers)."""
    return LAYERS[name].label if name in LAYERS else row(name).label


def canonical(name: str) -> str:
    """The registry name of a layer named the pre-registry way (other names unchanged)."""
    return LEGACY_NAMES.get(name, name)


# ----------------------------------------------------------------------------- path length
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_log(n: int, k: int) -> int:
    """Smallest L with k**L >= n (integer arithmetic)."""
    steps, v = 0, 1
    while v < n:
        v *= k
        steps += 1
    return steps


def max_path_length(row_name: str, n: int, p: int = 0, causal: bool = False) -> tuple[int, str]:
    """Closed-form maximum path length through a stack of ``row_name`` layers, and its formula.

    ``n >= 2`` positions; ``p`` is the row's ``path_param`` (kernel width k, window r).
    Contiguous kernels (and windows) of width p reach p - 1 positions further per layer
    when causal and floor((p - 1) / 2) each way otherwise; dilated causal convolutions
    with dilations 1, k, k^2, ... reach k^L positions in L layers; the recurrence takes
    one cell step per position.
    """
    row(row_name)
    if not (isinstance(n, int) and n >= 2):
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    if ROWS[row_name].path_param and not (isinstance(p, int) and p >= 2):
        raise ValueError(f"{row_name}: {ROWS[row_name].path_param} must be an integer >= 2, got {p!r}")
    if row_name == "self_attention":
        return 1, "1"
    if row_name == "recurrent":
        return n, "n (x_i -> h_i -> ... -> h_j, one hop per cell step)"
    if row_name == "convolutional_dilated":
        return _ceil_log(n, p), "ceil(log_k(n)) (causal, dilations 1, k, k^2, ...)"
    q = ROWS[row_name].path_param
    if not causal and p < 3:
        raise ValueError(f"{row_name}: a centred {q}={p} window reaches no other position; use {q} >= 3")
    if causal:
        return _ceil_div(n - 1, p - 1), f"ceil((n-1)/({q}-1))"
    return _ceil_div(n - 1, (p - 1) // 2), f"ceil((n-1)/floor(({q}-1)/2))"
