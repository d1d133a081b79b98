"""Decision → ``CheckResponse``, as Envoy's ext_authz filter reads it.

- Allow: ``status.code = OK`` and ``ok_response.headers`` adding, with the header
  names of the policy's ``responses`` section (:class:`~meshward.policy.model.
  Responses`; an empty name is not sent): the subject (the user's, else the peer's
  SPIFFE ID; default ``x-meshward-subject``), the user's groups joined by ``,``
  (``x-meshward-groups``; a group that contains ``,`` or a control character is left
  out, so the list stays unambiguous), the peer's SPIFFE ID (``x-meshward-workload``),
  and always ``x-meshward-decision-id`` — each with ``append_action =
  OVERWRITE_IF_EXISTS_OR_ADD``: a client-supplied value is replaced, never passed
  along (the default append action would *append*, letting a client smuggle an
  identity). When there is nothing to send (no groups, no workload) a client-supplied
  header of that name is removed (``headers_to_remove``) for the same reason.
  API keys are meshward's credential, not the upstream's: ``x-api-key`` is always
  removed, and so is ``Authorization`` when it carried the API key (``Authorization:
  ApiKey …``; a key in ``x-api-key`` leaves another scheme's ``Authorization`` to the
  upstream) or when ``remove_authorization`` is set.
- Deny: ``status.code = UNAUTHENTICATED`` (16) for 401s, ``PERMISSION_DENIED`` (7)
  otherwise, and ``denied_response`` with the HTTP status, ``content-type:
  application/json``, the body ``{"decision":"deny","reason":…,"decision_id":…}``
  (compact JSON; never a stack trace or policy text) and, for 401s,
  ``WWW-Authenticate``.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2

from authz.decision import Decision
from meshward.policy.model import Responses

SUBJECT_HEADER = "x-meshward-subject"
DECISION_ID_HEADER = "x-meshward-decision-id"
WORKLOAD_HEADER = "x-meshward-workload"

#: google.rpc.Code values used here.
GRPC_PERMISSION_DENIED = 7
GRPC_UNAUTHENTICATED = 16

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
API_KEY_HEADER = "x-api-key"


def _add_header(headers: Any, key: str, value: str) -> None:
    """Append an overwriting header to a repeated ``HeaderValueOption`` field, built in
    place (~4x cheaper than building each message and copying it into the response)."""
    headers.add(header={"key": key, "value": value}, append_action=_OVERWRITE)


def _groups_value(groups: tuple[str, ...]) -> str:
    return ",".join(g for g in groups if g and "," not in g and g.isprintable())


def deny_body(decision: Decision) -> str:
    """The exact deny body: compact JSON, three keys, in this order."""
    return json.dumps(
        {"decision": "deny", "reason": decision.reason, "decision_id": decision.decision_id},
        separators=(",", ":"),
    )


_DEFAULT_RESPONSES = Responses()


def to_check_response(
    decision: Decision, responses: Responses = _DEFAULT_RESPONSES
) -> external_auth_pb2.CheckResponse:
    """The ``CheckResponse`` that tells Envoy what to do with the request."""
    response = external_auth_pb2.CheckResponse()
    if decision.allowed:
        response.status.SetInParent()  # code OK (0): present, as Envoy expects
        ok = response.ok_response
        headers = ok.headers
        _add_header(headers, DECISION_ID_HEADER, decision.decision_id)
        remove = [API_KEY_HEADER]
        for name, value in (
            (responses.subject_header, decision.subject),
            (responses.groups_header, _groups_value(decision.groups)),
            (responses.workload_header, decision.workload),
        ):
            if not name:
                continue
            if value:
                _add_header(headers, name, value)
            else:
                remove.append(name)
        if responses.remove_authorization or decision.credential_in_authorization:
            remove.append("authorization")
        ok.headers_to_remove.extend(remove)
        return response
    unauthenticated = decision.http_status == 401
    response.status.code = GRPC_UNAUTHENTICATED if unauthenticated else GRPC_PERMISSION_DENIED
    response.status.message = decision.reason
    denied = response.denied_response
    denied.status.code = decision.http_status
    _add_header(denied.headers, "content-type", "application/json")
    if unauthenticated:
        _add_header(denied.headers, "www-authenticate", decision.www_authenticate)
    denied.body = deny_body(decision)
    return response
