"""Parquet files that hold the images (Hugging Face ``datasets``, ``img2dataset --output_format parquet``).

``input.image_column`` names the column: ``binary`` (the encoded image), or the ``datasets``
Image struct ``{bytes: binary, path: string}``. ``input.id_column`` names the column of image
ids, taken as they are; without it ``image_id`` is ``<file path>#<row>`` (the row in the file,
from 0, always unique), and ``uri`` is always ``<file uri>#<row>``. A row whose id is null or empty
gets a ``read_failed`` error row with ``<file path>#<row>`` as its ``image_id`` (never a null key).

Planning reads footers only, whatever the size of the files: no row, not even of the id column
(so ids are not checked for uniqueness, as a manifest's are). Units are runs of whole row groups
holding at least ``job.shard_size`` rows (a row group is read once, by one task); a decode task
streams its row groups by record batches, ``job.shard_size`` rows per output file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from ..model.errors import ConfigError, ErrorCode, InputReadError
from .manifest import _text, open_parquet
from .units import CarriedType, Sample, Unit, carried_types

logger = logging.getLogger(__name__)

_BATCH_ROWS = 65_536


def image_column_kind(arrow_type: pa.DataType) -> str | None:
    """``binary`` or ``struct`` (``{bytes, path}``) for a column that can hold images, else None."""
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "binary"
    if pa.types.is_struct(arrow_type):
        names = [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
        if "bytes" in names:
            inner = arrow_type.field(names.index("bytes")).type
            if pa.types.is_binary(inner) or pa.types.is_large_binary(inner):
                return "struct"
    return None


@dataclass
class ImageFile:
    """What planning learned about one Parquet file of images."""

    uri: str
    name: str
    stamp: str
    rows: int
    group_rows: list[int] = field(default_factory=list)
    carried: dict[str, CarriedType] = field(default_factory=dict)


def inspect_image_file(
    uri: str,
    name: str,
    stamp: str,
    *,
    image_column: str,
    id_column: str | None,
    keep: Sequence[str],
    timeout_s: float | None,
    s3_endpoint: str | None,
) -> ImageFile:
    """Read one file's footer and check its columns (no row is read)."""
    pf = open_parquet(uri, timeout_s, s3_endpoint)
    try:
        schema = pf.schema_arrow
        if image_column not in schema.names:
            raise ConfigError(
                f"{uri} has no column {image_column!r} (input.image_column; columns: {schema.names})"
            )
        if image_column_kind(schema.field(image_column).type) is None:
            raise ConfigError(
                f"{uri}: column {image_column!r} is {schema.field(image_column).type}; input.image_column needs "
                "binary image bytes or the datasets Image struct {bytes, path}"
            )
        if id_column is not None and id_column not in schema.names:
            raise ConfigError(f"{uri} has no column {id_column!r} (input.id_column; columns: {schema.names})")
        for column in keep:
            if column not in schema.names:
                raise ConfigError(
                    f"{uri} has no column {column!r} (input.keep_columns; columns: {schema.names})"
                )
        carried = carried_types(schema, keep, uri)
        md = pf.metadata
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return ImageFile(uri, name, stamp, md.num_rows, groups, carried)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"Could not read {uri}: {exc}") from exc
    finally:
        pf.close()


def image_units(image_file: ImageFile, first_index: int, shard_size: int, budget: int | None) -> list[Unit]:
    """Runs of whole row groups with at least ``shard_size`` rows each (the last may hold fewer);
    at most ``budget`` rows in all (the last unit is cut)."""
    units: list[Unit] = []
    limit = image_file.rows if budget is None else min(image_file.rows, budget)
    start, groups, rows = 0, [], 0
    for index, n in enumerate(image_file.group_rows):
        if start >= limit:
            break
        groups.append(index)
        rows += n
        if rows >= shard_size or start + rows >= limit:
            units.append(_unit(image_file, first_index + len(units), start, min(start + rows, limit), groups))
            start, groups, rows = start + rows, [], 0
    if groups and start < limit and rows:
        units.append(_unit(image_file, first_index + len(units), start, min(start + rows, limit), groups))
    return units


def _unit(image_file: ImageFile, index: int, start: int, stop: int, groups: list[int]) -> Unit:
    return Unit(
        index=index,
        kind="parquet",
        source=image_file.uri,
        name=image_file.name,
        stamp=image_file.stamp,
        start=start,
        stop=stop,
        row_groups=tuple(groups),
    )


def image_samples(
    unit: Unit,
    *,
    image_column: str,
    id_column: str | None,
    keep: Sequence[str] = (),
    max_bytes: int | None = None,
    timeout_s: float | None = None,
    s3_endpoint: str | None = None,
) -> Iterator[Sample]:
    """The rows of ``unit`` with their image bytes, streamed by record batches."""
    pf = open_parquet(unit.source, timeout_s, s3_endpoint)
    try:
        columns = list(dict.fromkeys([image_column, *([id_column] if id_column else []), *keep]))
        row = unit.start
        stop = unit.stop if unit.stop is not None else unit.start
        batches = pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=list(unit.row_groups), columns=columns)
        while row < stop:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except InputReadError as exc:  # a timed-out read: every row left gets the error
                for r in range(row, stop):
                    yield Sample(f"{unit.name}#{r}", f"{unit.source}#{r}", error=exc)
                return
            batch = batch.slice(0, stop - row)
            images = batch.column(image_column)
            if pa.types.is_struct(images.type):
                paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else None
                images = images.field("bytes")
            else:
                paths = None
            values = images.to_pylist()
            ids = _text(batch.column(id_column), unit.source, id_column).to_pylist() if id_column else None
            carried = {c: batch.column(c).to_pylist() for c in keep}
            for i, data in enumerate(values):
                uri = f"{unit.source}#{row}"
                missing_id = ids is not None and not (ids[i] or "").strip()
                # A row without an id gets its place as id (never a null key), and an error row.
                image_id = ids[i] if ids is not None and not missing_id else f"{unit.name}#{row}"
                sample = Sample(image_id, uri, carried={c: v[i] for c, v in carried.items()})
                if missing_id:
                    sample.error = InputReadError(
                        f"{uri}: the id column {id_column!r} (input.id_column) is "
                        f"{'null' if ids[i] is None else 'empty'} in this row"
                    )
                elif data is None:
                    where = f" (path {paths[i]!r})" if paths is not None and paths[i] else ""
                    sample.error = InputReadError(
                        f"{uri}: the {image_column!r} column holds no image bytes{where}"
                    )
                elif max_bytes is not None and len(data) > max_bytes:
                    sample.error = InputReadError(
                        f"Could not read {uri}: larger than {max_bytes} bytes", code=ErrorCode.TOO_LARGE
                    )
                else:
                    sample.data = data
                yield sample
                row += 1
    finally:
        pf.close()
