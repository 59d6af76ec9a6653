"""Kernel tests. The interpreter must be chosen at process start (see ktest_util.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
