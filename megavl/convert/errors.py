"""Errors the converters raise; each message says what is wrong and what would be valid."""

from __future__ import annotations

from typing import Sequence


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted."""


class UnsupportedArchitectureError(ConversionError):
    def __init__(self, found: Sequence[str], supported: Sequence[str], where: str):
        self.found = list(found)
        self.supported = list(supported)
        shown = ", ".join(self.found) if self.found else "none"
        super().__init__(
            f"{where}: architectures = [{shown}] is not supported; supported architectures: "
            f"{', '.join(self.supported)}"
        )


class TensorMismatchError(ConversionError):
    """Checkpoint tensors that are missing, unexpected or of the wrong shape, all listed."""

    def __init__(
        self,
        where: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        shapes: Sequence[tuple[str, tuple, tuple]] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shapes = list(shapes)
        lines = []
        if self.missing:
            lines.append(f"missing tensors ({len(self.missing)}):")
            lines += [f"  {name}" for name in self.missing]
        if self.unexpected:
            lines.append(f"unexpected tensors ({len(self.unexpected)}):")
            lines += [f"  {name}" for name in self.unexpected]
        if self.shapes:
            lines.append(f"shape mismatches ({len(self.shapes)}):")
            lines += [
                f"  {name}: expected {list(expected)}, got {list(got)}" for name, expected, got in self.shapes
            ]
        super().__init__(f"{where} does not match the model config:\n" + "\n".join(lines))


class UnsupportedModelError(ConversionError):
    """A megavl model that the target Hugging Face architecture cannot reproduce."""

