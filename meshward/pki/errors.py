"""Errors an operator can cause in the PKI (bad CA files, bad identities, bad lifetimes)."""

from __future__ import annotations


class PkiError(Exception):
    """A PKI problem caused by user input. The message names the input and the fix."""
