"""The error every config problem is reported with, all problems at once."""

from typing import Sequence


class ConfigError(ValueError):
    """A configuration that cannot be loaded or would not run."""


def report_problems(problems: Sequence[str], what: str) -> ConfigError:
    """One error listing every problem, so the user can fix them in one pass."""
    if len(problems) == 1:
        return ConfigError(f"{what}: {problems[0]}")
    lines = "\n".join(f"  - {p}" for p in problems)
    return ConfigError(f"{what} ({len(problems)} problems):\n{lines}")
