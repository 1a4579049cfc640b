"""What hardware and software this process has, and the back ends chosen from it.

Everything hardware-dependent is decided here once, so the rest of megavl asks
``detect()`` instead of probing imports itself.
"""

from megavl.platform.features import Platform, detect

__all__ = ["Platform", "detect"]
