"""One OpenTelemetry span per Check, under the right parent.

Parent choice (verified with Envoy 1.40, see DESIGN.md): when Envoy traces the
request it makes a CLIENT span for the ext_authz call and sends *that* span's
``traceparent``/``tracestate`` in the **gRPC call metadata**; the ``traceparent``
among ``CheckRequest.attributes.request.http.headers`` is only what the downstream
client sent, unchanged. So the parent is, in order:

1. the gRPC metadata ``traceparent`` (with its ``tracestate``; an empty tracestate
   counts as absent; its sampled flag is kept, so an unsampled parent gives an
   unsampled decision span under the SDK's default parent-based sampler);
2. else the request header ``traceparent`` (Envoy is not tracing);
3. else a new root.

An unparsable ``traceparent`` counts as absent. ``x-request-id`` is recorded either
way: Envoy's own ``ingress`` span carries the same value.

The span is created *after* the decision with its real start time and every
attribute at once (cheaper than setting them one by one). Spans never carry tokens,
headers or policy text. authz never installs a global tracer provider: the
:class:`~opentelemetry.trace.Tracer` is injected; :func:`setup_tracer_provider` is for
the process entry point.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from authz.decision import Decision
from authz.request import AuthzRequest

SPAN_NAME = "meshward.authz.check"

#: Where the decision span's parent came from (``meshward.trace_parent`` attribute).
PARENT_GRPC_METADATA = "grpc_metadata"
PARENT_HTTP_HEADER = "http_header"
PARENT_NONE = "root"

#: Environment variables that, when any is set, turn the OTLP exporter on.
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")

_PROPAGATOR = TraceContextTextMapPropagator()


class TracingSetupError(Exception):
    """The OTLP exporter cannot be loaded; the message says how to repair the install."""


def _carrier(traceparent: str | None, tracestate: str | None) -> dict[str, str] | None:
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:  # empty tracestate = absent
        carrier["tracestate"] = tracestate
    return carrier


def _extract(carrier: dict[str, str] | None) -> Context | None:
    if carrier is None:
        return None
    context = _PROPAGATOR.extract(carrier)
    if trace.get_current_span(context).get_span_context().is_valid:
        return context
    return None


def parent_context(
    metadata: Iterable[tuple[str, Any]] | None, headers: Mapping[str, str]
) -> tuple[Context, str]:
    """The decision span's parent context and where it came from (``PARENT_*``)."""
    traceparent = tracestate = None
    for key, value in metadata or ():
        if key == "traceparent":
            traceparent = value if isinstance(value, str) else None
        elif key == "tracestate":
            tracestate = value if isinstance(value, str) else None
    context = _extract(_carrier(traceparent, tracestate))
    if context is not None:
        return context, PARENT_GRPC_METADATA
    context = _extract(_carrier(headers.get("traceparent"), headers.get("tracestate")))
    if context is not None:
        return context, PARENT_HTTP_HEADER
    return Context(), PARENT_NONE


def span_attributes(
    decision: Decision, request: AuthzRequest | None, parent: str
) -> dict[str, str | int]:
    """The span's attributes; empty values are left out."""
    attributes: dict[str, str | int] = {
        "meshward.decision": "allow" if decision.allowed else "deny",
        "meshward.reason": decision.reason,
        "meshward.decision_id": decision.decision_id,
        "http.response.status_code": decision.http_status,
    }
    optional: tuple[tuple[str, str], ...] = (
        ("meshward.subject", decision.subject),
        ("meshward.auth_method", decision.auth_method),
        ("meshward.workload", decision.workload),
        ("meshward.route", decision.route),
        ("meshward.service", decision.service),
        ("meshward.gateway", decision.gateway),
        ("meshward.policy_version", decision.policy_version),
        ("meshward.matched_rule", decision.matched_rule),
    )
    if request is not None:
        optional += (
            ("http.request.method", request.method),
            ("url.path", request.path),
            ("meshward.request_id", request.request_id),
        )
    for key, value in optional:
        if value:
            attributes[key] = value
    if decision.proxy_policy_version and decision.proxy_policy_version != decision.policy_version:
        # The proxy's route came from another policy version (a rollout in progress).
        attributes["meshward.proxy_policy_version"] = decision.proxy_policy_version
    if parent != PARENT_GRPC_METADATA:  # the usual case behind a tracing Envoy: say nothing
        attributes["meshward.trace_parent"] = parent
    return attributes


def record_check_span(
    tracer: trace.Tracer,
    decision: Decision,
    request: AuthzRequest | None,
    metadata: Iterable[tuple[str, Any]] | None,
    *,
    start_ns: int,
    end_ns: int,
    internal_error: bool = False,
) -> trace.SpanContext:
    """Emit the decision's span (already finished) and return its span context."""
    context, parent = parent_context(metadata, request.headers if request is not None else {})
    span = tracer.start_span(
        SPAN_NAME,
        context=context,
        kind=SpanKind.SERVER,
        attributes=span_attributes(decision, request, parent),
        start_time=start_ns,
    )
    if internal_error:
        span.set_status(Status(StatusCode.ERROR, "internal error"))
    span.end(end_time=end_ns)
    return span.get_span_context()


def setup_tracer_provider(service_name: str) -> TracerProvider:
    """A tracer provider for a meshward process; not installed globally.

    Spans are exported with OTLP/gRPC through a batch processor only when one of
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (the
    exporter reads them, and the other ``OTEL_EXPORTER_OTLP_*`` settings, itself);
    otherwise spans are made (trace ids reach the decision log) but go nowhere.
    ``service_name`` is the default ``service.name``; ``OTEL_SERVICE_NAME`` overrides it. Call
    ``shutdown()`` on exit to flush. Raises :class:`TracingSetupError` when the
    exporter cannot be imported (the xds-protos file clash).
    """
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES (the operator's choice) win.
    configured = "service.name" in OTELResourceDetector().detect().attributes
    resource = Resource.create({} if configured else {"service.name": service_name})
    provider = TracerProvider(resource=resource)
    if any(os.environ.get(name) for name in OTLP_ENDPOINT_VARS):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as error:
            from meshward.install_check import repair_command

            raise TracingSetupError(
                f"the OTLP trace exporter cannot be imported ({error}); xds-protos has "
                f"overwritten opentelemetry-proto. Repair with: {repair_command()}"
            ) from error
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def trace_id_hex(span_context: trace.SpanContext) -> str:
    """``trace_id`` as 32 hex digits, empty when invalid."""
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
