"""What the conversion tools (and tools/expand_vocab.py) share: the verification options, process-group
ownership, errors and exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK, EXIT_LOGITS_DIFFER, EXIT_CANNOT_CONVERT = 0, 1, 2


def add_verification_options(parser: argparse.ArgumentParser, against: str) -> None:
    """--verify / --no-verify and --tolerance; against names the model compared with."""
    from megavl.convert.verify import AUTO_VERIFY_MAX_PARAMS, DEFAULT_TOLERANCE

    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=None,
        help=f"compare logits with {against} (default: on below {AUTO_VERIFY_MAX_PARAMS / 1e9:g}e9 parameters)",
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="largest allowed |logit difference| (fp32)")


def run_conversion(convert: Callable[[], object]) -> int:
    """Runs convert() and maps its outcome to the tools' exit codes.

    0: done (and verified when verification ran); 1: logits differ beyond the
    tolerance; 2: the model cannot be converted (the error says why).
    """
    import torch.distributed as dist

    from megavl.config import ConfigError
    from megavl.convert.errors import ConversionError
    from megavl.platform.distributed import shutdown

    # Called from a process that already has a process group (e.g. tests), leave it up.
    owns_world = not dist.is_initialized()
    try:
        result = convert()
    except (ConversionError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CANNOT_CONVERT
    finally:
        if owns_world:
            shutdown()
    verification = getattr(result, "verification", None)  # tools that only transform verify nothing
    if verification is not None and not verification.ok:
        print(f"error: {verification.describe()}", file=sys.stderr)
        return EXIT_LOGITS_DIFFER
    return EXIT_OK
