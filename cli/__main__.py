"""`python -m parscale_export.cli`: the same command line (serve starts itself this way)."""

from .main import run

run()
