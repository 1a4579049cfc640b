"""Silences megatron-core's import-time notices that Transformer Engine or apex is absent.

Importing megatron-core without them prints five UserWarnings (optimizers,
multi-tensor kernels, norms falling back to torch). The start-up platform line
(``Platform.describe``) already says in one line whether TE and apex were found
and which back ends were chosen, so these repeat it. Only these messages, and
only from megatron.core's own modules, are silenced; every other warning,
megatron's included, is left as it is.
"""

from __future__ import annotations

import warnings

_MISSING_BACKEND_MESSAGES = (
    # megatron.core.optimizer and its optimizer.py / clip_grads.py, and megatron_fsdp's mixed_precision.py.
    r"Transformer Engine and Apex are not installed\. Falling back to Torch optimizers\.",
    r"Transformer Engine and Apex are not installed\. Falling back to local implementations of multi_tensor_",
    # megatron.core.models.backends.
    r"Apex is not installed\. Falling back to Torch Norm",
)


def silence_missing_backend_warnings() -> None:
    """Installs the filters; must run before megatron-core is first imported. Idempotent."""
    for message in _MISSING_BACKEND_MESSAGES:
        # filterwarnings replaces an identical filter rather than adding a second one.
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=r"megatron\.core\.")
