"""``python -m llava_features``: the command line."""

import sys

from .cli import main

sys.exit(main())
