"""What the offline manifest checks report: one `Problem` per finding, and the one error they raise."""
from __future__ import annotations

from dataclasses import dataclass

from lookalike.core.errors import InputError


class ManifestError(InputError):
    """The manifests cannot be rendered or validated: the message says what and where."""


@dataclass(frozen=True)
class Problem:
    """One finding: `severity` is "error" (the cluster would refuse it) or "warning"."""

    severity: str
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.obj}: {self.field}" if self.field else self.obj
        return f"{self.severity.upper()} {where}: {self.message}"
