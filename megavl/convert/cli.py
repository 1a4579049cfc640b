"""What the two conversion tools share: process-group ownership, errors and exit codes."""

from __future__ import annotations

import sys
from typing import Callable

EXIT_OK, EXIT_LOGITS_DIFFER, EXIT_CANNOT_CONVERT = 0, 1, 2


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
    if result.verification is not None and not result.verification.ok:
        print(f"error: {result.verification.describe()}", file=sys.stderr)
        return EXIT_LOGITS_DIFFER
    return EXIT_OK
