"""The ``sam2-fast`` console script: ``sam2-fast bench ...`` and ``sam2-fast profile ...``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sam2-fast", description="sam2_fast tools")
    sub = parser.add_subparsers(dest="command", required=True)
    from sam2_fast.bench import command, profile

    command.build_parser(sub.add_parser("bench", help="side-by-side benchmark against the reference SAM 2"))
    profile.build_parser(sub.add_parser("profile", help="per-stage profile report (Markdown + plots)"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        command.run(args)
    else:
        profile.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
