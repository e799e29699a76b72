"""What to quantize: ``QuantizationConfig`` and the ``quantization=`` option's values."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from ttpu.errors import InvalidArgumentError

SCHEMES = ("int8", "int4", "gguf")
DEFAULT_GROUP_SIZE = 128  # int4: values per scale along the input dimension


@dataclass(frozen=True)
class QuantizationConfig:
    """``weights``: "int8" (symmetric) or "int4" (asymmetric: a scale and a minimum per
    group), rounded to nearest; "gguf" keeps a GGUF checkpoint's blocks as they are
    (each format as the int8 or int4 form that holds it exactly; float tensors stay
    float). Loading from a GGUF, "int8" and "int4" without a ``group_size`` also keep
    the blocks whose format maps exactly onto them (Q8_0 as int8 in groups of 32, Q4_K
    as int4 in groups of 32, ...) and quantize the rest. ``group_size``: one scale per that many input values
    (default: int8 one scale per output channel, int4 groups of 128); int4 packs two
    values per byte. ``exclude``: module names (or name suffixes, e.g. "lm_head") left in
    floating point. ``embeddings``: also quantize the token embedding (and with it a tied
    LM head)."""

    weights: str = "int8"
    group_size: int | None = None
    exclude: Sequence[str] = field(default_factory=tuple)
    embeddings: bool = True

    def __post_init__(self) -> None:
        if self.weights not in SCHEMES:
            raise InvalidArgumentError(
                f"unknown quantization scheme {self.weights!r}; valid: {', '.join(SCHEMES)}."
            )
        self._check_exclude()
        if self.group_size is None:
            return
        try:
            size = operator.index(self.group_size)
        except TypeError:
            size = 0
        if isinstance(self.group_size, bool) or size <= 0:
            raise InvalidArgumentError(f"group_size must be a positive integer (got {self.group_size!r}).")
        object.__setattr__(self, "group_size", size)
        if self.weights == "gguf":
            raise InvalidArgumentError("quantization 'gguf' keeps each GGUF block's own groups: leave group_size unset.")
        if self.weights == "int4" and self.group_size % 2:
            raise InvalidArgumentError(f"int4 packs two values per byte: group_size must be even (got {self.group_size}).")

    def _check_exclude(self) -> None:
        exclude = self.exclude or ()
        object.__setattr__(self, "exclude", (exclude,) if isinstance(exclude, str) else tuple(exclude))

    def excludes(self, name: str) -> bool:
        return any(name == e or name.endswith("." + e) for e in self.exclude)


def resolve_quantization(value: str | QuantizationConfig | None) -> QuantizationConfig | None:
    """``quantization=`` as given to ``from_pretrained``: None, a scheme name, or a config."""
    if value is None or isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        return QuantizationConfig(weights=value)
    raise InvalidArgumentError(
        f"quantization must be one of {', '.join(SCHEMES)} or a ttpu.QuantizationConfig (got {value!r})."
    )
