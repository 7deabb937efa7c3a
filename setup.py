"""Build of the optional C extension ``pipeline.images._resample`` (everything else is in pyproject.toml).

The extension is an exact, vectorised version of Pillow's resize used by the preprocessing; when
it cannot be built (no C compiler), the package still installs and preprocessing uses Pillow.
"""

from __future__ import annotations

import logging
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

logger = logging.getLogger(__name__)

# -ffp-contract=off: the filter weights are doubles that must round exactly as in Pillow's build
# (no fused multiply-add). -O3 lets the compiler vectorise the integer passes.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-std=gnu11"]


class _OptionalBuildExt(build_ext):
    """Build the extension when possible; a failure leaves the pure-Python (Pillow) path."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers, ...
            logger.warning("pipeline.images._resample not built (%s); preprocessing will use Pillow", exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            logger.warning("pipeline.images._resample not built (%s); preprocessing will use Pillow", exc)


setup(
    ext_modules=[
        Extension(
            "pipeline.images._resample",
            sources=["pipeline/images/_resample.c"],
            extra_compile_args=[] if sys.platform == "win32" else _FLAGS,
        )
    ],
    cmdclass={"build_ext": _OptionalBuildExt},
)
