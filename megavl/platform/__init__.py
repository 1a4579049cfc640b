"""What hardware and software this process has, and the back ends chosen from it.

Everything hardware-dependent is decided here once, so the rest of megavl asks
``detect()`` instead of probing imports itself. Importing this package also
silences megatron-core's missing-TE/apex warnings (``megatron_warnings``), which
the platform line reports instead; megavl.models imports it before megatron.
"""

from megavl.platform.megatron_warnings import silence_missing_backend_warnings

# Before anything below (or any importer of megavl.platform) imports megatron-core.
silence_missing_backend_warnings()

from megavl.platform.features import Platform, detect  # noqa: E402

__all__ = ["Platform", "detect"]
