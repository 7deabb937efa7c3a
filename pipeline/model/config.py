"""Model settings, and the machinery every config section uses: typed, range-checked, documented.

Pure Python (no torch import needed to build one), so the CLI and the job driver can resolve and
fingerprint a configuration without touching the model.

Every section of the product's configuration is a frozen dataclass whose fields carry

- a type annotation, checked when the section is built (``Literal`` choices, ``int``, ``float``,
  ``bool``, ``str``, ``X | None``, ``tuple[int, int]``, ``tuple[T, ...]``): YAML lists become
  tuples, an ``int`` is accepted for a ``float``, a ``bool`` is never an ``int``;
- an optional range in the field's metadata (:func:`setting`);
- a one-line docstring right below it (read by :func:`field_docs`: the CLI's help and the
  configuration reference, docs/configuration.md, come from there).

Errors are :class:`~pipeline.model.errors.ConfigError` s that name the YAML key
(``serve.port: expected an integer, got 'eighty'``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from .constants import (
    AspectRatio,
    AttnImplementation,
    CompileMode,
    ComputeDtype,
    PatchMergeType,
    SelectFeature,
    validate_projector_type,
)
from .errors import ConfigError

__all__ = ["ModelConfig", "check_section", "describe_type", "field_docs", "literal_choices", "setting"]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    message: str | None = None,
    **kwargs: Any,
) -> Any:
    """A dataclass field with a checked range (``ge``/``gt``/``le``) and, optionally, the words an
    error about it starts with (``message``, e.g. LLaVA's ``"Unexpected select feature"``)."""
    metadata = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "message": message}.items() if v is not None}
    return field(default=default, metadata=metadata, **kwargs)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass: the string literal right below each field (the
    attribute docstrings of PEP 257, read from the source as vLLM does)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # pragma: no cover - no source (frozen app)
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a ``Literal[...]`` (or ``Literal[...] | None``) annotation; None for other types."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if _is_union(annotation):
        for arg in get_args(annotation):
            if get_origin(arg) is Literal:
                return get_args(arg)
    return None


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def describe_type(annotation: Any) -> str:
    """An annotation in words (``one of 'binary', 'list'``; ``an integer or null``): for error messages
    and the configuration reference."""
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if _is_union(annotation):
        return " or ".join(describe_type(a) for a in get_args(annotation))
    if get_origin(annotation) is tuple:
        args = get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list of {len(args)} values ({', '.join(describe_type(a) for a in args)})"
    if get_origin(annotation) is dict or annotation is dict:
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    return {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(
        annotation, describe_type(annotation)
    )


class _MismatchError(Exception):
    """A value does not fit an annotation (internal to :func:`_coerce`)."""


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (and normalised: lists → tuples, int → float)."""
    if annotation is Any:
        return value
    origin = get_origin(annotation)
    if _is_union(annotation):
        for arg in get_args(annotation):
            try:
                return _coerce(value, arg)
            except _MismatchError:
                continue
        raise _MismatchError
    if annotation is type(None):
        if value is None:
            return None
        raise _MismatchError
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in get_args(annotation)):
            return value
        raise _MismatchError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _MismatchError
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _MismatchError
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _MismatchError
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _MismatchError
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _MismatchError
        args = get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise _MismatchError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise _MismatchError
    raise TypeError(f"unsupported config annotation {annotation!r}")  # pragma: no cover - a bug


def _range_error(value: Any, meta: dict[str, Any]) -> str | None:
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        if "ge" in meta and v < meta["ge"]:
            return f"must be >= {meta['ge']}"
        if "gt" in meta and v <= meta["gt"]:
            return f"must be > {meta['gt']}"
        if "le" in meta and v > meta["le"]:
            return f"must be <= {meta['le']}"
    return None


def check_section(section: Any) -> None:
    """Check (and normalise in place) every field of a frozen config section against its annotation
    and range. Called by each section's ``__post_init__``; errors name ``<section>.<field>``."""
    cls = type(section)
    name = getattr(cls, "SECTION", cls.__name__)
    hints = _hints(cls)
    for f in fields(cls):
        if not f.init or f.name == "extra":
            continue
        value = getattr(section, f.name)
        annotation = hints[f.name]
        where = f"{name}.{f.name}"
        try:
            clean = _coerce(value, annotation)
        except _MismatchError:
            choices = literal_choices(annotation)
            if choices is not None and not isinstance(value, list | tuple | dict):
                prefix = f.metadata.get("message", "Unexpected value")
                allowed = list(choices) + ([None] if _is_union(annotation) else [])
                raise ConfigError(
                    f"{prefix}: {value!r} ({where}); valid values are {', '.join(map(repr, allowed))}"
                ) from None
            raise ConfigError(f"{where}: expected {describe_type(annotation)}, got {value!r}") from None
        problem = _range_error(clean, dict(f.metadata))
        if problem:
            raise ConfigError(f"{where} {problem}, got {value!r}")
        if clean is not value:
            object.__setattr__(section, f.name, clean)


@dataclass(frozen=True)
class ModelConfig:
    """Which encoder to build and how it runs. ``None`` fields are read from the checkpoint."""

    SECTION: ClassVar[str] = "model"

    checkpoint: str | None = None
    """A LLaVA, llava-hf or bare CLIP checkpoint: a local directory or a model id in the local HF cache."""
    vision_tower: str | None = None
    """A CLIP vision model (directory or id) that replaces the checkpoint's own tower."""
    projector_weights: str | None = None
    """Standalone projector weights (``mm_projector.bin`` / ``.safetensors``) for a bare CLIP tower."""
    select_layer: int | tuple[int, ...] | None = None
    """Hidden layer to take features from (``mm_vision_select_layer``; LLaVA-1.5 uses -2); a list concatenates layers (llava-hf)."""
    select_feature: SelectFeature | None = setting(None, message="Unexpected select feature")
    """``patch`` drops the CLS token, ``cls_patch`` keeps it (``mm_vision_select_feature``)."""
    projector_type: str | None = None
    """``linear``, ``mlp{N}x_gelu`` or ``identity`` (``mm_projector_type``)."""
    mm_hidden_size: int | None = setting(None, ge=1)
    """Projector input width; defaults to the tower's hidden size."""
    hidden_size: int | None = setting(None, ge=1)
    """Projector output width (the language model's hidden size)."""
    image_aspect_ratio: AspectRatio | None = setting(None, message="Unknown image_aspect_ratio")
    """``pad`` (expand to square with the mean colour), ``square`` or ``crop`` (CLIP resize + center crop), ``anyres`` (LLaVA-NeXT tiles)."""
    anyres_max: int | None = setting(None, ge=1)
    """LLaVA-NeXT's ``anyres_max_N``: packed features are shrunk to about N tiles' worth of tokens."""
    patch_merge_type: PatchMergeType | None = setting(None, message="Unknown patch_merge_type")
    """LLaVA-NeXT's ``mm_patch_merge_type`` for packed anyres features: ``flat``, ``spatial`` or ``spatial_unpad``."""
    dtype: ComputeDtype = setting("auto", message="Unknown dtype")
    """Compute dtype: ``auto`` (bfloat16 on a GPU, float32 on a CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``."""
    attn_implementation: AttnImplementation = "sdpa"
    """Attention kernel of the CLIP tower (``sdpa`` or ``eager``)."""
    local_files_only: bool = True
    """Resolve model ids from the local HF cache only; never reach a hub unless this is False."""
    fuse_qkv: bool = True
    """Fast path: one Linear for q/k/v per layer (weights concatenated at load; one GEMM instead of three)."""
    fold_quick_gelu: bool = True
    """Fast path: fold quick_gelu's 1.702 into fc1/fc2 so the activation is one SiLU kernel (float32 |Δ| ≤ 1e-5)."""
    compile: bool = False
    """``torch.compile`` the tower + projector with static shapes: one graph per batch bucket, built at warm-up."""
    compile_mode: CompileMode | None = None
    """``torch.compile`` mode: null (default), ``reduce-overhead``, ``max-autotune``, ``max-autotune-no-cudagraphs``."""
    overlap_chunks: int = setting(2, ge=1)
    """On a GPU, a single-batch ``encode_pixels`` call runs as this many sub-batches so copies overlap compute (1: off)."""
    extra: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    """Unrecognised keys kept from the source (not part of the fingerprint)."""

    def __post_init__(self) -> None:
        check_section(self)
        if self.projector_type is not None:
            validate_projector_type(self.projector_type)
        if not _valid_device(self.device):
            raise ConfigError(f"model.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda", "mps"):
        return True
    kind, _, index = device.partition(":")
    return kind == "cuda" and index.isdigit()
