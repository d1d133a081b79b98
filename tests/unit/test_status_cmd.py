"""`meshward status` rendering: policy validity and one row per node."""

from __future__ import annotations

from meshward.status_cmd import render

STATUS = {
    "policy": {
        "path": "policies",
        "serving_version": "abc123def456",
        "valid": False,
        "errors": ["policies/mesh.yaml:12: bindings[0].role: role 'x' is not defined"],
    },
    "version": "abc123def456",
    "nodes": [
        {
            "id": "edge-1",
            "group": "edge",
            "protocol": "delta",
            "applied_version": "abc123def456",
            "convergence_seconds": 0.042,
            "last_ack_at": 1000.0,
            "error": None,
        },
        {
            "id": "authz-1",
            "group": "meshward-authz",
            "protocol": "sotw",
            "applied_version": "0123456789ab",
            "convergence_seconds": None,
            "last_ack_at": None,
            "error": "cannot bind 127.0.0.1:80",
        },
    ],
}


def test_render_shows_policy_errors_and_each_node() -> None:
    text = render(STATUS, now=1003.0)
    lines = text.splitlines()
    assert lines[0] == (
        "policy abc123def456 from policies: files INVALID (last good version still served)"
    )
    assert lines[1] == "  policies/mesh.yaml:12: bindings[0].role: role 'x' is not defined"
    header = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    rows = lines[header + 1 :]
    assert rows[0].split()[:6] == ["edge-1", "edge", "delta", "abc123def456", "42", "ms"]
    assert rows[0].endswith("3s ago")
    assert rows[1].split()[:4] == ["authz-1", "meshward-authz", "sotw", "0123456789ab"]
    assert rows[1].endswith("cannot bind 127.0.0.1:80")


def test_render_without_nodes() -> None:
    text = render({"policy": {"serving_version": "v", "valid": True}, "nodes": []})
    assert "files valid" in text and text.endswith("no nodes connected")
