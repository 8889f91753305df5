"""``python -m spectrim.cli``."""

import sys

from spectrim.cli.main import main

sys.exit(main())
