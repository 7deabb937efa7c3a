"""The product layer's vocabulary: what the encoder returns, how it is stored, what the job reads.

Pure Python, defined once: the config sections validate against these, the encoder, the table,
the job and the endpoint import them from here. (How the feature table is laid out and named is
the table's own: :mod:`pipeline.table.layout`.)
"""

from __future__ import annotations

from typing import Literal, get_args

FeatureKind = Literal["projected", "tower", "both"]
"""Which features the encoder returns: the projector's output, the tower's selected hidden state, or both."""
FEATURE_KINDS: tuple[str, ...] = get_args(FeatureKind)

OutputDtype = Literal["float16", "float32", "bfloat16"]
"""dtype features are returned and stored in (bfloat16 travels as its uint16 bit pattern)."""
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)

TensorFormat = Literal["binary", "list"]
"""Storage of tensor columns in the feature table: raw little-endian bytes (Delta ``binary``; every
dtype), or float32 arrays (Delta ``array<float>``; float32 only). See :mod:`pipeline.table.tensors`."""
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
