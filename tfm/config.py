"""Model configurations: the paper's defaults in dataclasses, validated in one place.

Every model's config is a frozen, keyword-only dataclass built on :class:`ModelConfig`,
which holds the fields all of them share (width, vocabularies, max_len, dtype), the one
validation routine and the dict round trip that ``save``/``load`` use:

    TransformerConfig    the encoder-decoder Transformer (Table 3 "base" by default)
    LSTMSeq2SeqConfig    the recurrent baseline (tfm.LSTMSeq2Seq)
    ConvS2SConfig        the convolutional baseline (tfm.ConvS2S)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

from ._checks import check_dropout

ACTIVATIONS = ("relu", "gelu")
NORM_POSITIONS = ("post", "pre")
DTYPES = ("float32", "float64")
PRESETS = ("base", "big", "small", "tiny")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every model has; subclasses name their integer fields in ``_positive`` (>= 1)
    and ``_non_negative`` (>= 0) and add checks in ``_check``."""

    d_model: int = 512
    src_vocab: int = 32000
    tgt_vocab: int = 32000
    max_len: int = 1024
    dtype: str = "float32"
    # Section 5.4's P_drop (the paper trains with 0.1); 0 keeps every result deterministic.
    # Acts only in training mode, in the training computations (``loss``, ``train_step``, ...).
    dropout: float = 0.0

    _positive: ClassVar[tuple[str, ...]] = ("d_model", "src_vocab", "tgt_vocab", "max_len")
    _non_negative: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for names, low, what in ((self._positive, 1, "a positive"), (self._non_negative, 0, "a non-negative")):
            for name in names:
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"{name} must be {what} integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check_dropout(self.dropout)
        self._check()

    def _check(self) -> None:
        """Checks beyond the integer fields and the dtype (none by default)."""

    def replace(self, **changes):
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(ModelConfig):
    """Hyper-parameters of the encoder-decoder Transformer (paper, Table 3 "base" by default).

    ``norm="post"`` is the paper's ``LayerNorm(x + Sublayer(x))``; ``"pre"`` is
    ``x + Sublayer(LayerNorm(x))``. ``final_norm`` adds a LayerNorm after each stack
    (as ``torch.nn.Transformer`` does). ``tie_embeddings`` shares the target embedding
    with the output projection (section 3.4).
    """

    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    activation: str = "relu"
    norm: str = "post"
    final_norm: bool = False
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = False

    _positive: ClassVar[tuple[str, ...]] = ModelConfig._positive + ("n_heads", "d_ff")
    _non_negative: ClassVar[tuple[str, ...]] = ("n_encoder_layers", "n_decoder_layers")

    def _check(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                f"each head needs d_model/n_heads dimensions"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.norm not in NORM_POSITIONS:
            raise ValueError(f"norm must be one of {NORM_POSITIONS}, got {self.norm!r}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def d_head(self) -> int:
        """d_k = d_v = d_model / h."""
        return self.d_model // self.n_heads

    # presets ------------------------------------------------------------------------
    @classmethod
    def base(cls, **overrides) -> "TransformerConfig":
        """The paper's base model: N=6, d_model=512, d_ff=2048, h=8 (Table 3)."""
        return cls(**overrides)

    @classmethod
    def big(cls, **overrides) -> "TransformerConfig":
        """The paper's big model: N=6, d_model=1024, d_ff=4096, h=16 (Table 3)."""
        return cls(**{"d_model": 1024, "n_heads": 16, "d_ff": 4096, **overrides})

    @classmethod
    def small(cls, **overrides) -> "TransformerConfig":
        """A small model for examples and quick studies: N=2, d_model=128, h=4."""
        return cls(**{"d_model": 128, "n_heads": 4, "d_ff": 512, "n_encoder_layers": 2,
                      "n_decoder_layers": 2, "src_vocab": 1000, "tgt_vocab": 1000,
                      "max_len": 512, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """A tiny model for tests: N=2, d_model=32, h=4 (odd-sized vocabularies)."""
        return cls(**{"d_model": 32, "n_heads": 4, "d_ff": 64, "n_encoder_layers": 2,
                      "n_decoder_layers": 2, "src_vocab": 53, "tgt_vocab": 47,
                      "max_len": 128, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return getattr(cls, name)(**overrides)


# The baselines' tiny presets share TransformerConfig.tiny's width and odd vocabularies.
_TINY = {"d_model": 32, "n_layers": 2, "src_vocab": 53, "tgt_vocab": 47, "max_len": 128}


@dataclass(frozen=True, kw_only=True)
class LSTMSeq2SeqConfig(ModelConfig):
    """Hyper-parameters of :class:`tfm.LSTMSeq2Seq`; ``d_model`` is the embedding and hidden size."""

    n_layers: int = 2

    _positive: ClassVar[tuple[str, ...]] = ModelConfig._positive + ("n_layers",)

    @classmethod
    def tiny(cls, **overrides) -> "LSTMSeq2SeqConfig":
        """For tests: d_model=32, 2 layers, odd-sized vocabularies (as TransformerConfig.tiny)."""
        return cls(**{**_TINY, **overrides})


@dataclass(frozen=True, kw_only=True)
class ConvS2SConfig(ModelConfig):
    """Hyper-parameters of :class:`tfm.ConvS2S`; ``n_layers`` blocks in each stack."""

    n_layers: int = 6
    kernel_size: int = 3

    _positive: ClassVar[tuple[str, ...]] = ModelConfig._positive + ("n_layers", "kernel_size")

    @classmethod
    def tiny(cls, **overrides) -> "ConvS2SConfig":
        """For tests: d_model=32, 2 layers, k=3, odd-sized vocabularies."""
        return cls(**{**_TINY, "kernel_size": 3, **overrides})
