"""``python -m banksim``: the bank simulator process."""

import sys

from banksim.cli import main

sys.exit(main())
