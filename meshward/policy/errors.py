"""Errors a policy author can cause, always reported as ``file:line: message``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file. ``line`` is 1-based; 0 when no line applies."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"


class PolicyError(Exception):
    """A policy that cannot be loaded. ``issues`` lists every problem found, in order."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))
