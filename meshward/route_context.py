"""The contract between the translator and authz: per-route ``context_extensions``.

The translator writes these keys into every route's ``ExtAuthzPerRoute``
(``check_settings.context_extensions``); Envoy copies them into
``CheckRequest.attributes.context_extensions`` for requests that matched the route.
authz therefore never re-matches paths Envoy already matched: a Check without
``ROUTE`` did not match any meshward route and is denied.
"""

from __future__ import annotations

#: The route's policy name (unique across the policy).
ROUTE = "meshward.route"
#: The service the route forwards to.
SERVICE = "meshward.service"
#: The gateway (Envoy node group) whose listener matched.
GATEWAY = "meshward.gateway"
#: The policy version the proxy's configuration was built from.
POLICY_VERSION = "meshward.policy_version"
