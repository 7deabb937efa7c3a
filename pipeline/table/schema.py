"""The feature table's schema and identity: what its columns are, and what wrote it.

:class:`TableSpec` fixes the columns of every data file of a table (one schema for the whole table,
checked when a file is built); :class:`TableIdentity` is what the first commit records (in the Delta
metadata's ``description``, so every snapshot carries it): the job that created the table, the
encoder fingerprint, the options that shape the schema (by their config keys) and the resolved config.

Columns, in order:

=================  ==========================  =============================================
column             Delta type                  meaning
=================  ==========================  =============================================
``image_id``       string, not null            the input's id (the table's key)
``uri``            string, not null            where the input was read from
``status``         string, not null            ``ok`` or ``error``
``error_code``     string                      stable :class:`ErrorCode`; null when ok
``error_message``  string                      readable reason; null when ok
``width``          integer                     original image width; null when unknown
``height``         integer                     original image height; null when unknown
(carried columns)  string/long/double/boolean  ``input.keep_columns``, in order; null when missing
``features``       tensor (binary or array)    projected features; null on error rows
``tower_features`` tensor                      optional: vision-tower features
``grid_rows``...   integer                     anyres: the tile grid and its canvas (4 columns)
``pooled``         array<float>                optional: mean over tokens, float32
=================  ==========================  =============================================

Tensor columns carry their dtype and shape in their field metadata (:mod:`pipeline.table.tensors`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from ..model.errors import ConfigError
from .layout import IDENTITY_KEY, TABLE_FORMAT
from .tensors import TensorSpec, check_tensor_format, pooled_field, tensor_field

__all__ = [
    "CARRIED_TYPES",
    "GRID_COLUMNS",
    "METADATA_COLUMNS",
    "OUTPUT_COLUMNS",
    "TENSOR_COLUMNS",
    "TableIdentity",
    "TableSpec",
]

_METADATA_FIELDS = (
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error_code", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
)
METADATA_COLUMNS: tuple[str, ...] = tuple(f.name for f in _METADATA_FIELDS)
"""The non-tensor columns of every data file, in order."""
TENSOR_COLUMNS: tuple[str, ...] = ("features", "tower_features")
"""The feature columns a table may have (projected, then tower), before the grid columns."""
GRID_COLUMNS: tuple[str, ...] = ("grid_rows", "grid_cols", "canvas_width", "canvas_height")
"""anyres outputs: each row's tile grid and the canvas its image was letterboxed onto (null on errors)."""
POOLED_COLUMN = "pooled"
OUTPUT_COLUMNS: frozenset[str] = frozenset((*METADATA_COLUMNS, *TENSOR_COLUMNS, *GRID_COLUMNS, POOLED_COLUMN))
"""Every column name the table has itself (a carried column may not take one)."""
CARRIED_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
}
"""Arrow types of carried columns by name (:data:`pipeline.storage.units.CarriedType`)."""


@dataclass(frozen=True)
class TableSpec:
    """The columns of a table: its feature tensors, pooled, carried columns, grids, storage."""

    tensors: tuple[tuple[str, TensorSpec], ...]
    """``(column, spec)`` of the feature columns, in :data:`TENSOR_COLUMNS` order."""
    tensor_format: str = "binary"
    """``job.tensor_format``: ``binary`` or ``list``."""
    pooled_dim: int | None = None
    """Values of ``pooled`` per row; None: no pooled column."""
    carried: tuple[tuple[str, str], ...] = ()
    """``(column, type)`` of the carried columns, in order (types of :data:`CARRIED_TYPES`)."""
    grids: bool = False
    """Whether the table has the anyres grid columns."""

    def __post_init__(self) -> None:
        names = [name for name, _ in self.tensors]
        if not names or any(n not in TENSOR_COLUMNS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"tensor columns must be some of {TENSOR_COLUMNS}, got {names}")
        for _, spec in self.tensors:
            check_tensor_format(self.tensor_format, spec.dtype)
        for name, kind in self.carried:
            if name in OUTPUT_COLUMNS:
                raise ConfigError(f"input.keep_columns: the table has a column {name!r} of its own already")
            if kind not in CARRIED_TYPES:
                raise ConfigError(
                    f"Unknown carried column type {kind!r}; expected one of {list(CARRIED_TYPES)}"
                )

    @property
    def dtype(self) -> str:
        """The dtype the features are stored in."""
        return self.tensors[0][1].dtype

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of every data file (Delta reads it as the table's schema)."""
        fields = list(_METADATA_FIELDS)
        fields += [pa.field(name, CARRIED_TYPES[kind]) for name, kind in self.carried]
        fields += [tensor_field(name, spec, self.tensor_format) for name, spec in self.tensors]
        if self.grids:
            fields += [pa.field(name, pa.int32()) for name in GRID_COLUMNS]
        if self.pooled_dim is not None:
            fields.append(pooled_field(POOLED_COLUMN, self.pooled_dim))
        return pa.schema(fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [
                [name, {"dtype": spec.dtype, "shape": list(spec.shape)}] for name, spec in self.tensors
            ],
            "tensor_format": self.tensor_format,
            "pooled_dim": self.pooled_dim,
            "carried": [list(c) for c in self.carried],
            "grids": self.grids,
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> TableSpec:
        return cls(
            tensors=tuple(
                (str(name), TensorSpec(str(t["dtype"]), tuple(t["shape"]))) for name, t in value["tensors"]
            ),
            tensor_format=str(value["tensor_format"]),
            pooled_dim=None if value.get("pooled_dim") is None else int(value["pooled_dim"]),
            carried=tuple((str(n), str(k)) for n, k in value.get("carried") or ()),
            grids=bool(value.get("grids", False)),
        )


@dataclass(frozen=True)
class TableIdentity:
    """What a table is, as its first commit recorded it (never changed afterwards)."""

    job: str
    """Id of the job that created the table."""
    created: str
    """When it was created (ISO 8601, UTC)."""
    fingerprint: str
    """Encoder fingerprint of every row of the table."""
    spec: TableSpec
    """The columns."""
    options: dict[str, Any] = field(default_factory=dict)
    """The options that shape the schema, by config key (``encoder.features``, ``encoder.pooled``,
    ``encoder.output_dtype``, ``job.tensor_format``, ``input.keep_columns``, ``encoder.anyres_output``)."""
    encoder: dict[str, Any] = field(default_factory=dict)
    """The fingerprinted description of the encoder (what the numbers depend on)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved config of the creating job."""
    sources: dict[str, Any] = field(default_factory=dict)
    """Where the model was read from (recorded, not fingerprinted)."""
    host: str = ""
    """The creating job's driver host."""
    format: int = TABLE_FORMAT

    def to_json(self) -> str:
        value = asdict(self)
        value["spec"] = self.spec.to_dict()
        value[IDENTITY_KEY] = value.pop("format")
        return json.dumps(value, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str | None) -> TableIdentity | None:
        """The identity a table's description holds; None when it is not one of ours."""
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not isinstance(value, dict) or IDENTITY_KEY not in value:
            return None
        return cls(
            job=str(value["job"]),
            created=str(value["created"]),
            fingerprint=str(value["fingerprint"]),
            spec=TableSpec.from_dict(value["spec"]),
            options=dict(value.get("options") or {}),
            encoder=dict(value.get("encoder") or {}),
            config=dict(value.get("config") or {}),
            sources=dict(value.get("sources") or {}),
            host=str(value.get("host") or ""),
            format=int(value[IDENTITY_KEY]),
        )

    @property
    def model(self) -> str | None:
        """The checkpoint the features come from (as configured), for people reading a report."""
        model = (self.config.get("model") or {}) if self.config else {}
        return model.get("checkpoint") or model.get("vision_tower") or self.sources.get("checkpoint")
