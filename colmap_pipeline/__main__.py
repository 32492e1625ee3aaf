"""``python -m colmap_pipeline``: the CLI of the core (see :mod:`colmap_pipeline.core.cli`)."""
from .core.cli import run

if __name__ == "__main__":
    run()  # main(), then os._exit: no interpreter teardown (see run)
