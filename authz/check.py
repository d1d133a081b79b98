"""One Check, end to end, independent of any serving loop.

:class:`Checker` is ``CheckRequest → CheckResponse`` plus its span, decision-log line
and metrics: parse once, decide (pure), respond. Any serving engine (the stock grpcio
server in :mod:`authz.server`, or a faster loop later) only has to hand it the decoded
request — or ``None`` when the bytes did not decode — and the call metadata.

It fails closed: an undecodable request gets a 403 ``malformed_request`` deny, a
Check before any policy arrived a 503 ``no_policy`` deny, and an internal error a 500
``internal_error`` deny (span status ERROR, traceback in the process log), never an
exception to the client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from opentelemetry import trace

from authz import reasons
from authz.compiled import CompiledPolicy
from authz.decision import Decision, decide, failure_decision
from authz.decision_log import DecisionLog
from authz.metrics import AuthzMetrics
from authz.request import AuthzRequest
from authz.response import to_check_response
from authz.tracing import DecisionSpans
from meshward.policy.model import Responses

_log = logging.getLogger("meshward.authz")
_DEFAULTS = Responses()


class Checker:
    """Decides Checks with the current compiled policy; swap it with :attr:`policy`
    (``None``: no policy yet, every Check is denied with ``no_policy``)."""

    def __init__(
        self,
        policy: CompiledPolicy | None,
        tracer: trace.Tracer,
        metrics: AuthzMetrics | None = None,
        decision_log: DecisionLog | None = None,
    ) -> None:
        #: Replaced whole by reloads (one reference store: atomic under the GIL).
        self.policy = policy
        self._spans = DecisionSpans(tracer)
        self._metrics = metrics
        self._log = decision_log if decision_log is not None else DecisionLog(background=False)

    def check(
        self,
        message: external_auth_pb2.CheckRequest | None,
        metadata: Iterable[tuple[str, Any]] | None = None,
    ) -> external_auth_pb2.CheckResponse:
        """The response for one decoded ``CheckRequest`` (None: undecodable)."""
        start_ns = time.time_ns()
        started = time.perf_counter()
        policy = self.policy  # read once: a reload mid-check does not mix policies
        request: AuthzRequest | None = None
        internal_error = False
        version = policy.version if policy is not None else ""
        try:
            if policy is None:
                if message is not None:  # parsed only for the span and decision log
                    request = AuthzRequest.from_check_request(message)
                decision = failure_decision(reasons.NO_POLICY, version, 503)
            elif message is None:
                decision = failure_decision(reasons.MALFORMED_REQUEST, version)
            else:
                request = AuthzRequest.from_check_request(message)
                decision = decide(request, policy, start_ns / 1e9)
            response = to_check_response(decision, policy.responses if policy else _DEFAULTS)
        except Exception:
            _log.exception("check failed; denying")
            internal_error = True
            decision = failure_decision(reasons.INTERNAL_ERROR, version, 500)
            response = to_check_response(decision)
        self._report(
            decision,
            request,
            metadata,
            start_ns=start_ns,
            started=started,
            internal_error=internal_error,
        )
        return response

    def _report(
        self,
        decision: Decision,
        request: AuthzRequest | None,
        metadata: Iterable[tuple[str, Any]] | None,
        *,
        start_ns: int,
        started: float,
        internal_error: bool,
    ) -> None:
        """Span, log line and metrics; a failure here never changes the decision."""
        try:
            trace_id = self._spans.record(
                decision,
                request,
                metadata,
                start_ns=start_ns,
                end_ns=time.time_ns(),
                internal_error=internal_error,
            )
            self._log.record(decision, request, trace_id, start_ns / 1e9)
            if self._metrics is not None:
                self._metrics.observe(
                    decision.allowed, decision.reason, time.perf_counter() - started
                )
        except Exception:
            _log.exception("reporting a decision failed")
