"""``meshward status``: the xDS server's ``/status`` as a table people can read.

It answers "which proxy runs which policy version, and why not the newest": the
served policy and whether the files are valid (with their ``file:line`` errors), then
one row per connected node (Envoy proxies and authz replicas) with the version it
has applied, how long it took to converge, and its last NACK error.

Without ``--url`` it reads the address ``meshward up`` wrote to ``.meshward/up.json``,
falling back to the xDS server's default status address.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:18001/status"


def register(sub: Any) -> None:
    p = sub.add_parser("status", help="show policy and per-node xDS versions as a table")
    p.add_argument(
        "--url",
        default=None,
        help=f"xDS server /status URL (default: from .meshward/up.json, else {DEFAULT_URL})",
    )
    p.add_argument("--state-dir", type=Path, default=Path(".meshward"))
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run)


def status_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url)
    try:
        info = json.loads((args.state_dir / "up.json").read_text())
        return str(info["xds_status_url"])
    except (OSError, ValueError, KeyError):
        return DEFAULT_URL


def run(args: argparse.Namespace) -> int:
    url = status_url(args)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - operator's URL
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(
            f"meshward status: cannot read {url} ({exc}); is the xDS server running? "
            "Pass its status address with --url http://HOST:PORT/status",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(render(data))
    policy = data.get("policy") or {}
    nodes = data.get("nodes") or []
    stale = [n for n in nodes if n.get("error")]
    return 1 if (policy and not policy.get("valid", True)) or stale else 0


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "-"
    secs = max(0.0, now - float(ts))
    if secs < 120:
        return f"{secs:.0f}s ago"
    if secs < 7200:
        return f"{secs / 60:.0f}m ago"
    return f"{secs / 3600:.1f}h ago"


def render(data: dict[str, Any], now: float | None = None) -> str:
    """The status JSON as text: a policy header, then a node table."""
    now = time.time() if now is None else now
    lines = []
    policy = data.get("policy") or {}
    serving = policy.get("serving_version") or data.get("policy_version", "?")
    state = "valid" if policy.get("valid", True) else "INVALID (last good version still served)"
    lines.append(f"policy {serving} from {policy.get('path', '?')}: files {state}")
    for err in policy.get("errors") or []:
        lines.append(f"  {err}")
    lines.append(f"snapshot version {data.get('version', '?')}")
    lines.append("")
    header = ("NODE", "GROUP", "PROTO", "APPLIED", "CONVERGED IN", "LAST ACK", "ERROR")
    rows = [header]
    for n in sorted(data.get("nodes") or [], key=lambda n: (n.get("group", ""), n.get("id", ""))):
        conv = n.get("convergence_seconds")
        rows.append(
            (
                str(n.get("id", "?")),
                str(n.get("group", "?")),
                str(n.get("protocol", "sotw")),
                str(n.get("applied_version") or "-"),
                f"{conv * 1000:.0f} ms" if isinstance(conv, int | float) else "-",
                _ago(n.get("last_ack_at"), now),
                str(n.get("error") or ""),
            )
        )
    if len(rows) == 1:
        lines.append("no nodes connected")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    return "\n".join(lines)
