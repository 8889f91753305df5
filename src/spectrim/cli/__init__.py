"""The ``spectrim`` command line (``spectrim --help``); :func:`main` runs it in-process.

Example::

    >>> from spectrim.cli import main
    >>> main(["list", "--quiet"])
    0
"""

from spectrim.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
