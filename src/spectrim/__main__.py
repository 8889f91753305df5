"""``python -m spectrim``: the command line (also ``torchrun ... -m spectrim compress``)."""

import sys

from spectrim.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
