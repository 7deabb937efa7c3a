"""``llava-features demo`` / ``make demo``: the offline job on the embedded default.

Needs the ``demo`` extra (scikit-image for the sample photos, pandas for the peek), which
``make`` installs with the test extras.

A local Ray, a generated tiny checkpoint (``.demo/tiny-llava``), a folder of sample photos (the
ones bundled with scikit-image, plus two broken files to show error rows), output to a local
folder; prints the job summary and a peek at the table.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_DIR = Path(".demo")
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera")


def write_sample_images(folder: Path) -> list[Path]:
    """Real photos as JPEG/PNG, plus a truncated JPEG and an empty file."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, name in enumerate(SAMPLE_PHOTOS):
        array = np.asarray(getattr(data, name)())
        path = folder / f"{name}.{'png' if i % 3 == 2 else 'jpg'}"
        Image.fromarray(array).save(path, quality=92)
        written.append(path)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(data.astronaut())).save(buf, format="JPEG")
    (folder / "broken-truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "broken-empty.png").write_bytes(b"")
    return [*written, folder / "broken-truncated.jpg", folder / "broken-empty.png"]


def main(args: argparse.Namespace) -> int:
    import pandas as pd
    import pyarrow as pa

    from .config import load_config
    from .job import run_job
    from .model.tiny import make_tiny_model
    from .reader import read_features

    model_dir = DEMO_DIR / "tiny-llava"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, "llava")
    images = DEMO_DIR / "images"
    if not images.exists():
        write_sample_images(images)
    output = Path(args.output)
    if output.exists():
        shutil.rmtree(output)  # the demo's own output folder, documented as replaced by each run
    config_file = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
    config = load_config(
        config_file if config_file.exists() else None,
        {
            "model": {"checkpoint": str(model_dir.resolve()), "dtype": "float32"},
            "job": {"pooled": True, "shard_size": 4, "batch_size": 8, "max_error_fraction": 0.5},
        },
    )
    summary = run_job(config, str(images), str(output))
    print("\n== summary ==")  # noqa: T201 - CLI output
    print(summary.format())  # noqa: T201
    table = read_features(str(output), status=None).table
    print("\n== table ==")  # noqa: T201
    peek = table.select(["image_id", "status", "error_code", "width", "height"])
    print(peek.to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get).to_string())  # noqa: T201
    result = read_features(str(output))
    print(f"\nfeatures of ok rows: {result.features.shape} {result.features.dtype}")  # noqa: T201
    print(f"first image, first token, first 6 values: {result.features[0, 0, :6]}")  # noqa: T201
    return 0
