"""A storage location as delta-rs (the ``deltalake`` package) takes it: its URI and ``storage_options``.

The feature table's data files are written with the pyarrow filesystems of :mod:`.fs`
(:func:`~.fs.resolve_filesystem`) and its transaction log by delta-rs, whose object_store clients are
configured by a dict of strings. The two must reach the same objects with the same credentials, so
the options are derived from the same settings by the same resolution (:func:`~.fs.s3_connection`,
:func:`~.fs.gcs_emulator`); this module only spells the result in object_store's vocabulary
(the keys of ``AmazonS3ConfigKey``, ``GoogleConfigKey``, ``ClientConfigKey``). It never imports
deltalake: nothing here talks to a store.
"""

from __future__ import annotations

import json
import logging

from ..model.errors import ConfigError
from .fs import _env, format_uri, gcs_emulator, s3_connection, split_uri

logger = logging.getLogger(__name__)

# delta-rs's own variable for a commit lock (read from the environment by delta-rs itself).
_LOCKING_PROVIDER = "AWS_S3_LOCKING_PROVIDER"


def delta_location(uri: str) -> str:
    """The table URI delta-rs takes for ``uri``: an absolute local path (``~``, relative paths and
    ``file://`` resolved as :func:`~.fs.resolve_filesystem` does), ``s3://bucket/prefix`` or
    ``gs://bucket/prefix`` (``gcs://`` spelled ``gs://``; no trailing ``/``).

    Raises ConfigError for an unsupported scheme or a missing bucket.
    """
    return format_uri(*split_uri(uri))


def delta_storage_options(
    uri: str, *, s3_endpoint: str | None = None, s3_region: str | None = None
) -> dict[str, str]:
    """The ``storage_options`` for delta-rs that reach ``uri`` as :func:`~.fs.resolve_filesystem` does.

    * Local paths: ``{}``.
    * ``s3://``: the endpoint and region :func:`~.fs.s3_connection` resolves (``s3_endpoint`` beats
      AWS_ENDPOINT_URL_S3, which beats AWS_ENDPOINT_URL; ``s3_region`` beats AWS_REGION, then
      AWS_DEFAULT_REGION, then us-east-1 with an endpoint; with neither, the bucket's region is
      looked up), set under both ``aws_endpoint`` and ``aws_endpoint_url_s3`` so that no variable
      of the environment can send delta-rs elsewhere than pyarrow; ``allow_http`` for an
      ``http://`` endpoint; ``AWS_FORCE_CREDENTIAL_LOAD`` so that delta-rs resolves credentials
      through the AWS SDK's default chain, as pyarrow does (first AWS_ACCESS_KEY_ID/
      AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN, then AWS_PROFILE and the shared config files, web
      identity, container and instance credentials); without it delta-rs skips that chain when an
      endpoint is set, and shared-profile credentials would not be found. And
      ``conditional_put: etag`` (see below). No credential is copied into the options.
    * ``gs://``: with STORAGE_EMULATOR_HOST, the emulator's URL as ``google_base_url``, no
      credentials (a service-account key with ``disable_oauth``, object_store's way of sending no
      token: its ``google_skip_signature`` still fetches a token for uploads, object_store issue
      #520) and ``allow_http`` for an ``http://`` emulator, like pyarrow's anonymous client.
      Without it, ``{}``: object_store's defaults, i.e. Google's default credentials
      (GOOGLE_SERVICE_ACCOUNT, GOOGLE_SERVICE_ACCOUNT_KEY or GOOGLE_APPLICATION_CREDENTIALS, the
      gcloud application-default file, then the metadata server), as pyarrow.

    **Concurrent writers on S3.** A Delta commit creates ``_delta_log/<version>.json`` only if it
    does not exist yet; two writers racing for one version must see one of them fail. delta-rs
    1.x does that with a conditional write (``PutObject`` with ``If-None-Match: *``, enabled by
    ``conditional_put: etag``, which this function always sets so that an AWS_CONDITIONAL_PUT in
    the environment cannot turn it off). What a user needs:

    - AWS S3: nothing more (conditional writes exist since August 2024, on general purpose and
      directory buckets). No DynamoDB table: delta-rs removed its DynamoDB log store (deltalake
      1.6.1 and later ignore ``AWS_S3_LOCKING_PROVIDER``), so this function refuses
      ``AWS_S3_LOCKING_PROVIDER`` rather than let a user believe commits are coordinated through
      DynamoDB; engines that do coordinate through it (Spark's ``S3DynamoDBLogStore``) must not
      write the same table.
    - S3-compatible stores (MinIO, Ceph, R2, ...): the store itself must implement conditional
      writes, answering a ``PutObject`` with ``If-None-Match: *`` on an existing key with 412
      (or 409). Check the vendor's documentation, or run this project's claim race
      (tests/test_delta_stores.py) against it: a store that ignores the header lets both writers
      "succeed", and the later commit silently replaces the earlier one.

    Raises ConfigError for an unsupported scheme, a missing bucket, a malformed endpoint, or
    ``AWS_S3_LOCKING_PROVIDER`` set for an ``s3://`` location.
    """
    scheme, path = split_uri(uri)
    if scheme == "s3":
        return _s3_options(path.split("/", 1)[0], s3_endpoint, s3_region)
    if scheme == "gs":
        return _gcs_options()
    return {}


def _s3_options(bucket: str, s3_endpoint: str | None, s3_region: str | None) -> dict[str, str]:
    provider = _env(_LOCKING_PROVIDER)
    if provider:
        raise ConfigError(
            f"{_LOCKING_PROVIDER}={provider} is set, but delta-rs has no locking provider any more "
            "(deltalake 1.6.1 removed its DynamoDB log store and ignores this variable): the feature "
            "table commits with S3 conditional writes (If-None-Match), which AWS S3 supports. Unset "
            f"{_LOCKING_PROVIDER}; writers that coordinate through DynamoDB must not write this table."
        )
    connection = s3_connection(bucket, s3_endpoint, s3_region)
    options = {"conditional_put": "etag", "AWS_FORCE_CREDENTIAL_LOAD": "true"}
    if connection.host:
        endpoint = f"{connection.scheme}://{connection.host}"
        options["aws_endpoint"] = options["aws_endpoint_url_s3"] = endpoint
        if connection.scheme == "http":
            options["allow_http"] = "true"
    if connection.region:
        options["aws_region"] = connection.region
    return options


def _gcs_options() -> dict[str, str]:
    emulator = gcs_emulator()
    if emulator is None:
        return {}
    scheme, host = emulator
    base_url = f"{scheme}://{host}"
    # object_store's fields of a service-account key; disable_oauth makes it send an empty token.
    no_credentials = {
        "gcs_base_url": base_url,
        "disable_oauth": True,
        "client_email": "",
        "private_key": "",
        "private_key_id": "",
    }
    options = {"google_base_url": base_url, "google_service_account_key": json.dumps(no_credentials)}
    if scheme == "http":
        options["allow_http"] = "true"
    return options
