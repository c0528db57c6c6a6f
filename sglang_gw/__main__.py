"""`python -m sglang_gw` is the `sglang-gw` command (the supervisor spawns engines this way)."""

import sys

from .cli import main

sys.exit(main())
