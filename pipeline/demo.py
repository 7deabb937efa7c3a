"""``llava-features demo`` / ``make demo``: the offline job on the embedded default.

Needs the ``demo`` extra (scikit-image for the sample photos, pandas for the peek), which
``make`` installs with the test extras.

A local Ray, a generated tiny checkpoint (``.demo/tiny-llava`` under the working directory), a
folder of sample photos (the ones bundled with scikit-image, plus two broken files to show error
rows), output to a local folder; the command line prints the job summary, a peek at the table and
where to go next (``llava-features inspect``, ``read_features``, DuckDB).
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

from .offline import JobSummary

logger = logging.getLogger(__name__)

DEMO_DIR = Path(".demo")
CONFIG_FILE = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
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


def run_demo(output: Path) -> JobSummary:
    """Prepare the embedded default (tiny model, sample images) and run the job into ``output``
    (the demo's own folder: replaced by each run)."""
    from .config import load_config
    from .model.tiny import make_tiny_model
    from .model.tower import quiet_progress_bars
    from .offline import run_job

    model_dir = DEMO_DIR / "tiny-llava"
    if not (model_dir / "config.json").exists():
        with quiet_progress_bars():
            make_tiny_model(model_dir, "llava")
    images = DEMO_DIR / "images"
    if not images.exists():
        write_sample_images(images)
    if output.exists():
        shutil.rmtree(output)
    config = load_config(
        CONFIG_FILE,
        {"model": {"checkpoint": str(model_dir.resolve())}, "encoder": {"pooled": True}},
    )
    # Absolute: the encoder actors write the shards, from their own working directory.
    return run_job(config, str(images), str(output.resolve()))
