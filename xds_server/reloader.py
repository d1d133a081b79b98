"""Hot reload: watch the policy directory, apply every valid edit, refuse every bad one.

Edits arrive as bursts of file events (an editor's write + rename, ``git checkout``
touching many files), so events are debounced (``debounce_ms``, 100 ms by default:
:func:`watchfiles.awatch` yields once a burst has been quiet that long) and the
*whole* policy is reloaded and validated each time. Then:

* valid and a new version → applied (translated, snapshots set, streams pushed);
* valid and the same version (a comment or formatting edit) → nothing to push;
* invalid → rejected: the last good policy keeps serving, and the ``file:line``
  errors stay visible in the log, in :meth:`PolicyReloader.status` and in the
  ``meshward_xds_policy_errors`` gauge until an edit fixes them.

Loading runs in a worker thread (file I/O, YAML and JWKS parsing) so the event loop
keeps serving ADS streams meanwhile. Reloads are serialized: a burst that arrives
during a reload triggers one more reload after it, never two at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import watchfiles
from prometheus_client import CollectorRegistry, Counter, Gauge

from meshward.policy.errors import PolicyError
from meshward.policy.loader import load_policy
from meshward.policy.model import Policy

log = logging.getLogger("meshward.xds.reload")

Apply = Callable[[Policy], Awaitable[None]]


def _relevant(change: watchfiles.Change, path: str) -> bool:
    """Policy YAML and JSON (JWKS) files; not editor swap/backup files or hidden files."""
    name = Path(path).name
    if name.startswith(".") or name.endswith("~"):
        return False
    return name.endswith((".yaml", ".yml", ".json"))


class PolicyReloader:
    """Keeps the served policy in step with the files under ``path``."""

    def __init__(
        self,
        path: str | Path,
        apply: Apply,
        current: Policy,
        registry: CollectorRegistry,
        debounce_ms: int = 100,
    ) -> None:
        self.path = Path(path)
        self._apply = apply
        self._debounce_ms = debounce_ms
        self._lock = asyncio.Lock()
        self._version = current.version
        self._errors: list[str] = []
        self._last_reload_at: float | None = None
        self._last_applied_at = time.time()
        self._last_error_at: float | None = None
        self._reloads = Counter(
            "meshward_xds_policy_reloads",
            "Policy reloads by result (applied, unchanged, rejected).",
            ["result"],
            registry=registry,
        )
        self._error_gauge = Gauge(
            "meshward_xds_policy_errors",
            "Errors in the policy files right now (0: the files are valid and served).",
            registry=registry,
        )
        self._reload_errors = Counter(
            "meshward_xds_policy_reload_errors",
            "Reloads rejected because the policy files were invalid.",
            registry=registry,
        )
        self._error_gauge.set(0)

    @property
    def errors(self) -> list[str]:
        return list(self._errors)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on every debounced burst of relevant changes until ``stop`` is set."""
        async for _changes in watchfiles.awatch(
            self.path,
            watch_filter=_relevant,
            debounce=self._debounce_ms,
            step=20,
            stop_event=stop,
            recursive=True,
        ):
            await self.reload("file change")

    async def reload(self, reason: str) -> str:
        """Load, validate and apply the files once; returns the result word."""
        async with self._lock:
            self._last_reload_at = time.time()
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
            except PolicyError as exc:
                return self._reject([str(i) for i in exc.issues], reason)
            if policy.version == self._version:
                self._clear_errors()
                self._reloads.labels("unchanged").inc()
                log.info(
                    "policy files changed but not their meaning; nothing to push",
                    extra={"version": policy.version, "reason": reason},
                )
                return "unchanged"
            try:
                await self._apply(policy)
            except ValueError as exc:  # translation refused it: same treatment as invalid
                return self._reject([f"{self.path}: {exc}"], reason)
            previous, self._version = self._version, policy.version
            self._last_applied_at = time.time()
            self._clear_errors()
            self._reloads.labels("applied").inc()
            log.info(
                "policy reloaded and pushed",
                extra={"version": policy.version, "previous": previous, "reason": reason},
            )
            return "applied"

    def _reject(self, errors: list[str], reason: str) -> str:
        self._errors = errors
        self._last_error_at = time.time()
        self._error_gauge.set(len(errors))
        self._reload_errors.inc()
        self._reloads.labels("rejected").inc()
        log.error(
            "policy edit rejected; the last good policy keeps serving",
            extra={"errors": errors, "serving_version": self._version, "reason": reason},
        )
        return "rejected"

    def _clear_errors(self) -> None:
        if self._errors:
            log.info("policy files are valid again", extra={"version": self._version})
        self._errors = []
        self._error_gauge.set(0)

    def status(self) -> dict[str, Any]:
        """JSON-able: what is served, whether the files are valid, and why not."""
        return {
            "path": str(self.path),
            "serving_version": self._version,
            "valid": not self._errors,
            "errors": list(self._errors),
            "last_reload_at": self._last_reload_at,
            "last_applied_at": self._last_applied_at,
            "last_error_at": self._last_error_at,
        }
