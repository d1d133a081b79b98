"""meshward authz: the Envoy ``envoy.service.auth.v3.Authorization/Check`` service.

Laid out by pipeline phase, as Kuadrant/authorino does:

- :mod:`authz.request` parses a ``CheckRequest`` once into a small view;
- :mod:`authz.identity` turns credentials into an :class:`~authz.identity.base.Identity`,
  one module per method (``jwt`` today; API key and mTLS SPIFFE are new files);
- :mod:`authz.authorization` decides what an identity may do (RBAC on the policy);
- :mod:`authz.decision` is the pure decision function, :mod:`authz.response` turns a
  decision into a ``CheckResponse``;
- :mod:`authz.tracing` and :mod:`authz.decision_log` make one span and one log line per
  decision; :mod:`authz.check` ties the phases together as one function per request;
- :mod:`authz.server` is the gRPC serving loop, kept apart so the engine can change.
"""
