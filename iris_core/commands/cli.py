"""``iris-segment``: the command line. Each command lives in its module (segment, research, model_tools)
with its options; this one parses, runs and words errors for the terminal."""

from __future__ import annotations

import argparse
import logging
import sys

from iris_core.commands import model_tools, research, segment, service
from iris_core.commands.terminal import in_cli_words
from iris_core.errors import IrisError

log = logging.getLogger("iris_core")
#: libraries whose INFO logs are shown only with --debug (highdicom: a line per DICOM module it copies into a SEG)
QUIET_LIBRARIES = ("highdicom",)


def build_parser() -> argparse.ArgumentParser:
    """The command line: global options, then one sub-command; each command module adds its own options."""
    ap = argparse.ArgumentParser(prog="iris-segment", description="In-context 3D medical image segmentation")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    # --debug is also accepted after the command (iris-segment segment ... --debug)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and debug logs")
    sub = ap.add_subparsers(dest="command", required=True)
    segment.add_parser(sub, [common])
    research.add_parsers(sub, [common])
    model_tools.add_parsers(sub, [common])
    service.add_parsers(sub, [common])
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    for name in QUIET_LIBRARIES:  # their INFO lines say what they do inside, not what the user asked
        logging.getLogger(name).setLevel(logging.NOTSET if args.debug else logging.WARNING)
    from iris_core.pipeline.allocator import (
        retain_freed_memory,  # torch-free: the checks before any work stay quick
    )

    retain_freed_memory()  # a process of our own: reuse freed memory (glibc), window after window
    try:
        return args.func(args)
    except IrisError as exc:
        if args.debug:
            raise
        print(f"error: {in_cli_words(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
