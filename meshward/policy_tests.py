"""``meshward test``: policy test cases (YAML) run through the real decision code.

A test file is a YAML list of cases (schema: docs/policy-testing.md)::

    - name: alice deletes an order
      request: {method: DELETE, path: /orders/1, subject: alice}
      expect: {decision: allow}

Every case is built and decided by :func:`meshward.explain.run` — the same
``CheckRequest`` → :func:`authz.decision.decide` path as ``meshward explain`` and
authz itself. Output: one ``file:line: case NAME: expected …, got …`` line per
failing case, ``file:line: message`` per mistake in a test file, then ``PASS: n/n``
or ``FAIL: k/n``. Exit 0 when every case passed, 1 when one failed, 2 on errors in
test files or the policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from authz import reasons
from authz.compiled import CompiledPolicy
from authz.identity.jwks_remote import JwksRegistry
from meshward import explain
from meshward.demo_keys import DemoKey
from meshward.policy.matching import address_problem
from meshward.policy.model import Policy
from meshward.policy.yaml_source import YamlSyntaxError, compose

CASE_KEYS = ("name", "request", "expect")
REQUEST_KEYS = (
    "method",
    "path",
    "host",
    "route",
    "subject",
    "groups",
    "claims",
    "token",
    "api_key",
    "spiffe",
    "source_ip",
    "port",
    "headers",
)
EXPECT_KEYS = ("decision", "status", "reason", "audit_outcome")
AUDIT_OUTCOMES = ("none", "would_deny", "would_allow")


@dataclass(frozen=True)
class Case:
    file: str
    line: int
    name: str
    request: dict[str, Any]
    decision: str
    status: int | None = None
    reason: str | None = None
    #: ``none``, ``would_deny`` or ``would_allow``; None: not checked.
    audit_outcome: str | None = None

    def expected(self) -> str:
        parts = [self.decision]
        if self.status is not None:
            parts.append(str(self.status))
        if self.reason is not None:
            parts.append(self.reason)
        if self.audit_outcome is not None:
            parts.append(f"audit {self.audit_outcome}")
        return "/".join(parts)


@dataclass
class CaseFile:
    path: str
    cases: list[Case] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def find_test_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``*.yaml``/``*.yml`` files in it (name order)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if path.is_file():
        return [path]
    raise explain.InputError(f"{path}: no such file or directory")


def _scalar(node: Node) -> Any:
    return yaml.safe_load(yaml.serialize(node))


class _Reader:
    def __init__(self, file: CaseFile) -> None:
        self.file = file

    def error(self, node: Node, message: str) -> None:
        self.file.errors.append(f"{self.file.path}:{node.start_mark.line + 1}: {message}")

    def mapping(self, node: Node, what: str, allowed: tuple[str, ...]) -> dict[str, Node] | None:
        if not isinstance(node, MappingNode):
            self.error(node, f"{what}: expected a mapping")
            return None
        out: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, ScalarNode) else None
            if key not in allowed:
                self.error(key_node, f"{what}: unknown key '{key}' (allowed: {', '.join(allowed)})")
            elif key in out:
                self.error(key_node, f"{what}: duplicate key '{key}'")
            else:
                out[key] = value_node
        return out

    def string(self, node: Node, what: str) -> str | None:
        value = _scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, str) or not value:
            self.error(node, f"{what}: expected a non-empty string")
            return None
        return value

    def read(self, root: Node | None) -> None:
        if root is None:
            return  # an empty file: no cases
        if not isinstance(root, SequenceNode):
            self.error(root, "a test file is a list of cases (- name: …, request: …, expect: …)")
            return
        names: set[str] = set()
        for index, node in enumerate(root.value):
            case = self.case(node, f"case {index + 1}")
            if case is None:
                continue
            if case.name in names:
                self.error(node, f"case {case.name}: duplicate case name in this file")
                continue
            names.add(case.name)
            self.file.cases.append(case)

    def case(self, node: Node, what: str) -> Case | None:
        fields = self.mapping(node, what, CASE_KEYS)
        if fields is None:
            return None
        errors = len(self.file.errors)
        for key in CASE_KEYS:
            if key not in fields:
                self.error(node, f"{what}: missing '{key}'")
        name = self.string(fields["name"], f"{what}.name") if "name" in fields else None
        if name is not None:
            what = f"case {name}"
        request = (
            self.request(fields["request"], f"{what}.request") if "request" in fields else None
        )
        expect = self.expect(fields["expect"], f"{what}.expect") if "expect" in fields else None
        if name is None or request is None or expect is None or len(self.file.errors) > errors:
            return None
        decision, status, reason, audit = expect
        return Case(
            self.file.path,
            node.start_mark.line + 1,
            name,
            request,
            decision,
            status,
            reason,
            audit,
        )

    def request(self, node: Node, what: str) -> dict[str, Any] | None:
        fields = self.mapping(node, what, REQUEST_KEYS)
        if fields is None:
            return None
        out: dict[str, Any] = {"method": "GET"}
        if "path" not in fields:
            self.error(node, f"{what}: missing 'path'")
        for key in ("method", "path", "host", "route", "subject", "token", "api_key", "spiffe"):
            if key in fields:
                value = self.string(fields[key], f"{what}.{key}")
                if value is not None:
                    out[key] = value
        if "path" in out and not out["path"].startswith("/"):
            self.error(fields["path"], f"{what}.path: '{out['path']}' must start with '/'")
        if "groups" in fields:
            groups_node = fields["groups"]
            groups = _scalar(groups_node) if isinstance(groups_node, SequenceNode) else None
            if not isinstance(groups, list) or not all(isinstance(g, str) and g for g in groups):
                self.error(groups_node, f"{what}.groups: expected a list of group names")
            elif "subject" not in fields:
                self.error(groups_node, f"{what}.groups: needs 'subject' (the demo token's sub)")
            else:
                out["groups"] = groups
        if "token" in fields and "subject" in fields:
            self.error(fields["token"], f"{what}: set either 'token' or 'subject'/'groups'")
        self.client_parts(fields, what, out)
        return out

    def client_parts(self, fields: dict[str, Node], what: str, out: dict[str, Any]) -> None:
        """``claims`` (for the demo token), ``source_ip``, ``port`` and ``headers``."""
        if "claims" in fields:
            claims = (
                _scalar(fields["claims"]) if isinstance(fields["claims"], MappingNode) else None
            )
            if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
                self.error(fields["claims"], f"{what}.claims: expected a mapping of claim names")
            elif "subject" not in fields:
                self.error(
                    fields["claims"], f"{what}.claims: needs 'subject' (the demo token's sub)"
                )
            else:
                out["claims"] = claims
        if "source_ip" in fields:
            ip = self.string(fields["source_ip"], f"{what}.source_ip")
            if ip is not None and address_problem(ip) is not None:
                self.error(fields["source_ip"], f"{what}.source_ip: '{ip}' is not an IP address")
            elif ip is not None:
                out["source_ip"] = ip
        if "port" in fields:
            port = _scalar(fields["port"]) if isinstance(fields["port"], ScalarNode) else None
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                self.error(fields["port"], f"{what}.port: expected a port (1-65535)")
            else:
                out["port"] = port
        if "headers" in fields:
            headers = (
                _scalar(fields["headers"]) if isinstance(fields["headers"], MappingNode) else None
            )
            if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
            ):
                self.error(fields["headers"], f"{what}.headers: expected a mapping of name: value")
            else:
                out["headers"] = tuple((k.lower(), v) for k, v in headers.items())

    def expect(
        self, node: Node, what: str
    ) -> tuple[str, int | None, str | None, str | None] | None:
        fields = self.mapping(node, what, EXPECT_KEYS)
        if fields is None:
            return None
        if "decision" not in fields:
            self.error(node, f"{what}: missing 'decision' (allow or deny)")
            return None
        decision = (
            _scalar(fields["decision"]) if isinstance(fields["decision"], ScalarNode) else None
        )
        if decision not in ("allow", "deny"):
            self.error(fields["decision"], f"{what}.decision: expected 'allow' or 'deny'")
            return None
        status: int | None = None
        if "status" in fields:
            value = _scalar(fields["status"]) if isinstance(fields["status"], ScalarNode) else None
            if not isinstance(value, int) or isinstance(value, bool) or not 100 <= value <= 599:
                self.error(fields["status"], f"{what}.status: expected an HTTP status (100-599)")
                return None
            status = value
        reason: str | None = None
        if "reason" in fields:
            reason = self.string(fields["reason"], f"{what}.reason")
            if reason is None:
                return None
            if reason not in reasons.ALL:
                known = ", ".join(sorted(reasons.ALL))
                self.error(fields["reason"], f"{what}.reason: unknown reason '{reason}' ({known})")
                return None
            if (reason == reasons.ALLOWED) != (decision == "allow"):
                self.error(fields["reason"], f"{what}.reason: '{reason}' contradicts {decision}")
                return None
        audit: str | None = None
        if "audit_outcome" in fields:
            audit = self.string(fields["audit_outcome"], f"{what}.audit_outcome")
            if audit is not None and audit not in AUDIT_OUTCOMES:
                self.error(
                    fields["audit_outcome"],
                    f"{what}.audit_outcome: expected one of {', '.join(AUDIT_OUTCOMES)}",
                )
                return None
        return str(decision), status, reason, audit


def read_test_file(path: Path) -> CaseFile:
    """Parse one test file; problems land in ``errors`` as ``file:line: message``."""
    result = CaseFile(str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        result.errors.append(f"{path}: cannot read: {exc}")
        return result
    try:
        root = compose(text)
    except YamlSyntaxError as exc:
        line = f":{exc.line}" if exc.line else ""
        result.errors.append(f"{path}{line}: invalid YAML: {exc.problem}")
        return result
    _Reader(result).read(root)
    return result


class _Runner:
    """Runs cases against one policy, minting demo tokens as needed (cached)."""

    def __init__(self, policy: Policy, policy_path: Path, state_dir: Path) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.state_dir = state_dir
        # Keys of jwks_uri issuers: fetched once, kept if the policy is reloaded.
        self.jwks = JwksRegistry(background=False)
        self.compiled: CompiledPolicy = explain.compile_with_keys(policy, self.jwks)
        self.key: DemoKey | None = None
        self.tokens: dict[tuple[str, tuple[str, ...], str], str] = {}

    def token(
        self, subject: str, groups: tuple[str, ...], claims: dict[str, Any] | None = None
    ) -> str:
        if self.key is None:
            self.key = explain.demo_key_for(self.policy, self.policy_path, self.state_dir)
            if not explain.demo_key_is_current(self.policy, self.key):
                self.policy = explain.load(self.policy_path)
                self.compiled = explain.compile_with_keys(self.policy, self.jwks)
        cache_key = (subject, groups, json.dumps(claims or {}, sort_keys=True, default=str))
        cached = self.tokens.get(cache_key)
        if cached is None:
            cached = self.tokens[cache_key] = self.key.mint(subject, groups, extra=claims)
        return cached

    def run(self, case: Case) -> str | None:
        """``None`` when the case passes, else what was decided (``allow (binding x)`` …)."""
        request = case.request
        token = request.get("token", "")
        if "subject" in request:
            token = self.token(
                request["subject"], tuple(request.get("groups", ())), request.get("claims")
            )
        outcome = explain.run(
            self.policy,
            self.compiled,
            method=request["method"],
            path=request["path"],
            host=request.get("host", ""),
            route=request.get("route"),
            client=explain.Client(
                token=token,
                api_key=request.get("api_key", ""),
                principal=request.get("spiffe", ""),
                source_ip=request.get("source_ip", ""),
                port=request.get("port", 0),
                headers=request.get("headers", ()),
            ),
        )
        decision = outcome.decision
        got = "allow" if decision.allowed else "deny"
        ok = (
            got == case.decision
            and (case.status is None or case.status == decision.http_status)
            and (case.reason is None or case.reason == decision.reason)
            and (
                case.audit_outcome is None
                or case.audit_outcome == (decision.audit_outcome or "none")
            )
        )
        if ok:
            return None
        audit = f" (audit {decision.audit_outcome or 'none'})" if case.audit_outcome else ""
        if decision.allowed:
            return f"allow (binding {decision.matched_rule.split('/', 1)[0]}){audit}"
        return f"deny/{decision.http_status}/{decision.reason}{audit}"


def default_policy_path(tests_path: Path) -> Path:
    """The directory above the tests: ``policies/`` for ``policies/tests/``."""
    directory = tests_path if tests_path.is_dir() else tests_path.parent
    return directory.resolve().parent


def run_tests(paths: list[Path], policy_path: Path | None, state_dir: Path) -> int:
    """Run every case of the test files at ``paths``; print results; the exit code."""
    try:
        files = [read_test_file(f) for p in paths for f in find_test_files(p)]
        if policy_path is None:
            parents = {default_policy_path(p) for p in paths}
            if len(parents) > 1:
                raise explain.InputError(
                    "the test paths belong to different policies; pass --policy"
                )
            policy_path = parents.pop()
        policy = explain.load(policy_path)
    except explain.InputError as exc:
        print(f"meshward test: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(
            f"meshward test: no test files (*.yaml) in {', '.join(map(str, paths))}",
            file=sys.stderr,
        )
        return 2
    try:
        runner = _Runner(policy, policy_path, state_dir)
    except explain.InputError as exc:
        print(f"meshward test: {exc}", file=sys.stderr)
        return 2
    total = passed = 0
    errors = 0
    for test_file in files:
        for error in test_file.errors:
            print(error)
        errors += len(test_file.errors)
        for case in test_file.cases:
            total += 1
            try:
                got = runner.run(case)
            except explain.InputError as exc:
                print(f"{case.file}:{case.line}: case {case.name}: {exc}")
                errors += 1
                continue
            if got is None:
                passed += 1
            else:
                where = f"{case.file}:{case.line}: case {case.name}"
                print(f"{where}: expected {case.expected()}, got {got}")
    if errors:
        print(f"ERROR: {errors} error(s) in test files; {passed}/{total} cases passed")
        return 2
    if passed == total:
        print(f"PASS: {passed}/{total}")
        return 0
    print(f"FAIL: {total - passed}/{total}")
    return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "test", help="run policy test cases (YAML); exit 1 when one fails (like opa test)"
    )
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        default=[Path("policies/tests")],
        metavar="PATH",
        help="test directories or files (default: policies/tests)",
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="the policy to test (default: the directory above the tests)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshward"),
        help="where the demo private key lives (default: .meshward)",
    )
    parser.set_defaults(func=_cmd_test)


def _cmd_test(args: argparse.Namespace) -> int:
    return run_tests(list(args.paths), args.policy, args.state_dir)
