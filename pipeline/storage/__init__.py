"""The input side of the offline job: where images are, how to list, plan and read them.

``--input`` is one of

* a local directory (``/data/images``, ``./images``, ``file:///data/images``) or an object-store
  prefix (``s3://bucket/prefix``, ``gs://bucket/prefix``): every file under it, recursively,
  whose extension is in :data:`IMAGE_EXTENSIONS` (case-insensitive; hidden files and folders,
  whose name starts with ``.``, are skipped); a folder with no image but tar files is a set of
  WebDataset shards, one with only ``.parquet``/``.csv`` files a sharded manifest;
* a glob (``/data/*/*.jpg``, ``s3://bucket/photos/**/*.png``) or brace notation
  (``s3://bucket/shards/{00000..09999}.tar``): exactly the files it names;
* a single image, tar or manifest;
* manifests: ``.parquet`` or ``.csv`` files with a ``uri`` column and an optional ``image_id``
  column (relative ``uri``s are resolved against the manifest's folder);
* Parquet files holding the images (``input.image_column``).

Modules: :mod:`~pipeline.storage.fs` (URIs, filesystems, output helpers), :mod:`~.delta` (the same
locations as delta-rs takes them: URI and storage options), :mod:`~.listing`
(folders, globs, braces; a symlink-safe local walk), :mod:`~.read` (timed reads that never open
special files), :mod:`~.units` (the plan's vocabulary), :mod:`~.plan` (planning and expanding
units), and one module per container kind: :mod:`~.manifest`, :mod:`~.webdataset`,
:mod:`~.images_parquet`.

Workers receive plain URIs plus the ``s3_endpoint`` setting (and the storage environment, which
the job forwards) and build their filesystems themselves (:func:`resolve_filesystem`, cached per
process); filesystem objects never cross the Ray hop.
"""

from __future__ import annotations

from .delta import delta_location, delta_storage_options
from .fs import (
    SUPPORTED_SCHEMES,
    S3Connection,
    _effective_s3_endpoint,
    _effective_s3_region,
    absolute_uri,
    ensure_output_dir,
    format_uri,
    gcs_emulator,
    join_path,
    output_is_empty,
    read_json,
    relative_path,
    resolve_filesystem,
    s3_connection,
    split_uri,
    write_json,
)
from .listing import (
    IMAGE_EXTENSIONS,
    MANIFEST_EXTENSIONS,
    TAR_EXTENSIONS,
    expand_braces,
    glob_to_regex,
    is_image_path,
    is_tar_path,
    walk_local,
)
from .plan import (
    InputOptions,
    InputPlan,
    ReadOptions,
    Shard,
    expand_unit,
    list_inputs,
    plan_fingerprint,
    plan_inputs,
    plan_shards,
)
from .read import open_input, read_bytes, special_file_reason
from .units import CARRIED_PREFIX, InputItem, Sample, Unit

__all__ = [
    "CARRIED_PREFIX",
    "IMAGE_EXTENSIONS",
    "MANIFEST_EXTENSIONS",
    "SUPPORTED_SCHEMES",
    "TAR_EXTENSIONS",
    "InputItem",
    "InputOptions",
    "InputPlan",
    "ReadOptions",
    "S3Connection",
    "Sample",
    "Shard",
    "Unit",
    "_effective_s3_endpoint",
    "_effective_s3_region",
    "absolute_uri",
    "delta_location",
    "delta_storage_options",
    "ensure_output_dir",
    "expand_braces",
    "expand_unit",
    "format_uri",
    "gcs_emulator",
    "glob_to_regex",
    "is_image_path",
    "is_tar_path",
    "join_path",
    "list_inputs",
    "open_input",
    "output_is_empty",
    "plan_fingerprint",
    "plan_inputs",
    "plan_shards",
    "read_bytes",
    "read_json",
    "relative_path",
    "resolve_filesystem",
    "s3_connection",
    "special_file_reason",
    "split_uri",
    "walk_local",
    "write_json",
]
