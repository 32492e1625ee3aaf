"""``python -m colmap_pipeline``: the CLI of the core (see :mod:`colmap_pipeline.core.cli`)."""
import sys

from .core.cli import main

if __name__ == "__main__":
    sys.exit(main())
