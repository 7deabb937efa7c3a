"""The product layer's vocabulary: what the encoder returns, how outputs are laid out and named.

Pure Python, defined once: the config sections validate against these, the encoder, the sink,
the reader, the job and the endpoint import them from here. (The model's own vocabulary — select
modes, aspect ratios, compute dtypes, projector types — is :mod:`pipeline.model.constants`.)
"""

from __future__ import annotations

import re
from typing import Literal, get_args

FeatureKind = Literal["projected", "tower", "both"]
"""Which features the encoder returns: the projector's output, the tower's selected hidden state, or both."""
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)

OutputDtype = Literal["float16", "float32", "bfloat16"]
"""dtype features are returned and stored in (bfloat16 travels as its uint16 bit pattern)."""
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)

TensorFormat = Literal["binary", "fixed_shape_tensor"]
"""Parquet encoding of tensor columns: our ``llava_features.tensor`` extension over raw bytes, or
Arrow's canonical ``arrow.fixed_shape_tensor``."""
TENSOR_FORMATS: tuple[str, ...] = get_args(TensorFormat)

Compression = Literal["none", "snappy", "lz4", "zstd", "gzip", "brotli"]
"""Parquet compression codecs of the feature files."""
COMPRESSIONS: tuple[str, ...] = get_args(Compression)

AlphaMode = Literal["auto", "drop", "white"]
"""How transparency becomes RGB: ``drop`` the alpha channel (LLaVA's ``Image.open(f).convert("RGB")``),
composite on ``white`` (transformers' ``convert_to_rgb``, what llava-hf processors do), or ``auto``: the
checkpoint layout's own rule (drop for original LLaVA and bare CLIP checkpoints, white for llava-hf)."""
ALPHA_MODES: tuple[str, ...] = get_args(AlphaMode)

SixteenBit = Literal["llava", "high_byte"]
"""How 16-bit images become 8-bit: ``llava`` (PIL's ``convert("RGB")`` as LLaVA loads them: values above
255 clip to white) or ``high_byte`` (opt-in: keep each value's high byte, the picture as it looks)."""
SIXTEEN_BIT_MODES: tuple[str, ...] = get_args(SixteenBit)

AnyresOutput = Literal["tiles", "packed"]
"""What an anyres (LLaVA-NeXT) image's features are: ``tiles`` ``[1 + tiles, tokens, dim]`` (base image
first) or ``packed``, LLaVA-NeXT's ``spatial_unpad`` + ``image_newline`` sequence ``[tokens, dim]``."""
ANYRES_OUTPUTS: tuple[str, ...] = get_args(AnyresOutput)

InputFormat = Literal["auto", "images", "manifest", "webdataset", "parquet"]
"""What ``--input`` holds: image files, manifests of uris, WebDataset tar shards, or Parquet files with the
image bytes in a column; ``auto`` tells them apart by their names (and ``input.image_column``)."""
INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)

# -- the shared GPU pool (the endpoint's replicas encoding the offline job's shards) ----------------

SERVE_ENCODER_DEPLOYMENT = "FeaturesEncoder"
"""Name of the Serve deployment whose replicas serve the HTTP API and encode offline shards."""
SERVE_DESCRIBE_METHOD = "describe_pool"
"""Its method giving the encoder fingerprint and the offline settings (:class:`pipeline.records.PoolInfo`)."""
SERVE_SHARD_METHOD = "encode_shard"
"""Its method encoding and committing one :class:`pipeline.records.DecodedShard` (returns a ``ShardSummary``)."""

# -- output rows ---------------------------------------------------------------------------------

STATUS_OK = "ok"
"""``status`` of a row whose image was encoded."""
STATUS_ERROR = "error"
"""``status`` of a row whose input failed (``error_code`` says why)."""

# -- output files ----------------------------------------------------------------------------------

JOB_FILE = "_job.json"
"""The plan, resolved config and encoder fingerprint of an output (written first)."""
SUCCESS_FILE = "_SUCCESS"
"""Counts and fingerprint of a finished output (written last)."""
CONFIG_KEY = "llava_features.config"
"""Parquet key-value metadata: the resolved config and encoder description (JSON)."""
FINGERPRINT_KEY = "llava_features.fingerprint"
"""Parquet key-value metadata: the encoder fingerprint of every row in the file."""
LAYOUT_KEY = "llava_features.layout"
"""Parquet key-value metadata: the version of the shard layout."""
LAYOUT_VERSION = "1"

SHARD_FILE_PATTERN = re.compile(r"^part-(\d{6,})(?:-(\d{5,}))?\.parquet$")
"""Name of a committed output file: group 1 is its unit (shard) index, group 2 (when present) its piece
within the unit."""
SHARD_TEMP_PATTERN = re.compile(r"^\.part-(\d{6,})(?:-(\d{5,}))?\.parquet\.[0-9a-f]+\.tmp$")
"""Name of an output file being written (hidden; local filesystems only)."""
COMMITS_DIR = "_commits"
"""Folder of an output holding one commit record per committed unit (written after all of its files)."""
COMMIT_FILE_PATTERN = re.compile(r"^unit-(\d{6,})\.json$")
"""Name of a unit's commit record; group 1 is the unit index."""


def shard_file_name(shard_index: int, piece: int | None = None) -> str:
    """File name of an output file: ``part-000012.parquet``, or ``part-000012-00003.parquet`` for piece 3
    of unit 12 (both match :data:`SHARD_FILE_PATTERN`)."""
    if shard_index < 0:
        raise ValueError(f"shard_index must be >= 0, got {shard_index}")
    if piece is None:
        return f"part-{shard_index:06d}.parquet"
    if piece < 0:
        raise ValueError(f"piece must be >= 0, got {piece}")
    return f"part-{shard_index:06d}-{piece:05d}.parquet"


def shard_index(file_name: str) -> int | None:
    """The unit (shard) index of an output file's name, None for any other name."""
    match = SHARD_FILE_PATTERN.match(file_name)
    return int(match.group(1)) if match else None


def shard_piece(file_name: str) -> tuple[int, int] | None:
    """``(unit, piece)`` of an output file's name (piece 0 for ``part-NNNNNN.parquet``), None for any other name."""
    match = SHARD_FILE_PATTERN.match(file_name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def commit_file_name(unit: int) -> str:
    """File name of unit ``unit``'s commit record (in :data:`COMMITS_DIR`)."""
    return f"unit-{unit:06d}.json"
