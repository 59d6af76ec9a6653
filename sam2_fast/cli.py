"""The ``sam2-fast`` console script.

Everyday use: ``track`` (a video), ``track-many`` (a manifest of videos, on local
processes or Ray), ``segment`` (an image, from clicks or a box), ``amg`` (every object of
an image), ``download`` (an official checkpoint). Tools: ``bench``,
``profile``. ``sam2-fast COMMAND --help`` shows each one's options and examples.

Errors the user can fix (a missing file, a malformed prompt, a checkpoint for another
model, an unwritable folder, ...) print one line, ``sam2-fast COMMAND: error: ...``, and
exit with status 2 (1 for other failures); ``SAM2_FAST_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

EPILOG = """everyday use:
  sam2-fast download large
  sam2-fast track clip.mp4 --model large --point 0:1:210,350 --save png,overlay --out out/
  sam2-fast segment photo.jpg --point 500,375 --out mask.png
  sam2-fast amg photo.jpg --out masks/
"""


def _parser() -> argparse.ArgumentParser:
    from sam2_fast.commands import download, image, track, track_many

    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="sam2-fast", description="SAM 2 segmentation and tracking, fast.",
                                     epilog=EPILOG, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    track.build_parser(sub.add_parser("track", help="track prompted objects through a video", epilog=track.EXAMPLES,
                                      description=track.__doc__.replace("``", ""), formatter_class=fmt))
    track_many.build_parser(sub.add_parser("track-many", help="track many videos from a manifest (local workers or Ray)",
                                           epilog=track_many.EXAMPLES, description=track_many.__doc__.replace("``", ""),
                                           formatter_class=fmt))
    image.build_segment_parser(sub.add_parser("segment", help="one mask on an image from clicks or a box",
                                              epilog=image.SEGMENT_EXAMPLES, formatter_class=fmt))
    image.build_amg_parser(sub.add_parser("amg", help="masks of every object of an image (automatic mask generator)",
                                          epilog=image.AMG_EXAMPLES, formatter_class=fmt))
    download.build_parser(sub.add_parser("download", help="fetch an official checkpoint into the cache",
                                         epilog=download.EXAMPLES, description=download.__doc__.replace("``", ""), formatter_class=fmt))
    from sam2_fast.bench import command, profile

    command.build_parser(sub.add_parser("bench", help="side-by-side benchmark against the reference SAM 2"))
    profile.build_parser(sub.add_parser("profile", help="per-stage profile report (Markdown + plots)"))
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "track":
        from sam2_fast.commands import track

        return track.run(args)
    if args.command == "track-many":
        from sam2_fast.commands import track_many

        return track_many.run(args)
    if args.command == "segment":
        from sam2_fast.commands import image

        return image.run_segment(args)
    if args.command == "amg":
        from sam2_fast.commands import image

        return image.run_amg(args)
    if args.command == "download":
        from sam2_fast.commands import download

        return download.run(args)
    from sam2_fast.bench import command, profile

    if args.command == "bench":
        command.run(args)
    else:
        profile.run(args)
    return 0


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from sam2_fast.commands.models import CliError

    prog = f"sam2-fast {args.command}"
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except CliError as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - every failure gets one line, not a traceback
        if os.environ.get("SAM2_FAST_DEBUG"):
            raise
        from sam2_fast.checkpoint import CheckpointError
        from sam2_fast.config import ConfigError

        known = (CheckpointError, ConfigError, ValueError, FileNotFoundError, PermissionError, ImportError)
        kind = "" if isinstance(exc, known) else f"{type(exc).__name__}: "
        print(f"{prog}: error: {kind}{_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, known) else 1


if __name__ == "__main__":
    sys.exit(main())
