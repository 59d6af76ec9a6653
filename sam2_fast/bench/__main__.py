"""``python -m sam2_fast.bench``: the same as ``sam2-fast bench``."""

import sys

from sam2_fast.bench.command import main

sys.exit(main())
