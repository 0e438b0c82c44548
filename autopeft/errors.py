"""Errors a user can act on.

A `UserError` is bad input: the CLI prints its message as one line and exits 2. Code raises it *before*
writing anything, so a rejected command leaves no study, run or directory half-made.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: one line naming what is wrong and how to fix it (exit code 2)."""


class TrialFailed(Exception):
    """A trial ended without a result; `reason` is recorded (oom, nan, crash), the study goes on."""

    def __init__(self, reason: str, detail: str = "", *, memory_mb: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.memory_mb = memory_mb  # peak memory measured up to the failure (recorded for `oom`)
