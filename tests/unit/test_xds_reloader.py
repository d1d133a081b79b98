"""Hot reload with real files and a real file watcher (watchfiles)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from meshward.policy.loader import load_policy
from meshward.policy.model import Policy
from tests.policy_files import VALID_POLICY, new_keys, write_policy
from xds_server.reloader import PolicyReloader


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Policy] = []
        self.event = asyncio.Event()

    async def __call__(self, policy: Policy) -> None:
        self.applied.append(policy)
        self.event.set()


def _edit(directory: Path, text: str) -> None:
    (directory / "mesh.yaml").write_text(
        text.format(orders_port=18081, catalog_port=18082, gateway_port=18080)
    )


async def _wait_for(predicate: object, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


def test_watcher_applies_valid_edits_and_rejects_bad_ones(tmp_path: Path) -> None:
    directory = write_policy(tmp_path / "p", keys=new_keys())
    initial = load_policy(directory)
    registry = CollectorRegistry()

    async def scenario() -> None:
        rec = Recorder()
        reloader = PolicyReloader(directory, rec, initial, registry, debounce_ms=150)
        stop = asyncio.Event()
        watcher = asyncio.create_task(reloader.watch(stop))
        await asyncio.sleep(0.3)  # the watcher is armed

        # A valid semantic edit is applied.
        _edit(directory, VALID_POLICY.replace("subjects: [alice]", "subjects: [alice, bob]"))
        assert await _wait_for(lambda: len(rec.applied) == 1)
        assert rec.applied[0].version != initial.version
        assert rec.applied[0].bindings[0].subjects == ("alice", "bob")
        assert reloader.status()["serving_version"] == rec.applied[0].version

        # An invalid edit is rejected with file:line errors; nothing is applied.
        _edit(directory, VALID_POLICY.replace("    role: catalog-reader", "    role: nope"))
        assert await _wait_for(lambda: not reloader.status()["valid"])
        errors = reloader.status()["errors"]
        assert len(errors) == 1 and f"{directory}/mesh.yaml:" in errors[0]
        assert "role 'nope' is not defined" in errors[0]
        assert len(rec.applied) == 1
        assert registry.get_sample_value("meshward_xds_policy_errors") == 1
        assert registry.get_sample_value("meshward_xds_policy_reload_errors_total") == 1
        assert reloader.status()["serving_version"] == rec.applied[0].version

        # Fixing it clears the error; a comment-only edit pushes nothing new.
        _edit(
            directory,
            "# comment only\n"
            + VALID_POLICY.replace("subjects: [alice]", "subjects: [alice, bob]"),
        )
        assert await _wait_for(lambda: reloader.status()["valid"])
        assert len(rec.applied) == 1
        assert registry.get_sample_value("meshward_xds_policy_errors") == 0
        assert (
            registry.get_sample_value("meshward_xds_policy_reloads_total", {"result": "unchanged"})
            == 1
        )

        # A burst of edits is debounced into few reloads, ending at the last content.
        for i in range(10):
            _edit(directory, VALID_POLICY.replace("subjects: [alice]", f"subjects: [u{i}]"))
            await asyncio.sleep(0.005)
        assert await _wait_for(lambda: rec.applied[-1].bindings[0].subjects == ("u9",))
        assert len(rec.applied) <= 3, len(rec.applied)

        # Key rotation: a changed JWKS file is a policy change too.
        before = len(rec.applied)
        write_policy(directory, text=VALID_POLICY.replace("subjects: [alice]", "subjects: [u9]"))
        assert await _wait_for(lambda: len(rec.applied) > before)

        stop.set()
        await asyncio.wait_for(watcher, 5)

    asyncio.run(scenario())


def test_translation_failure_counts_as_rejection(tmp_path: Path) -> None:
    directory = write_policy(tmp_path / "p")
    initial = load_policy(directory)

    async def refuse(policy: Policy) -> None:
        raise ValueError("gateway 'edge' routes to unknown service 'x'")

    async def scenario() -> None:
        reloader = PolicyReloader(directory, refuse, initial, CollectorRegistry())
        _edit(directory, VALID_POLICY.replace("subjects: [alice]", "subjects: [zed]"))
        assert await reloader.reload("test") == "rejected"
        assert "unknown service 'x'" in reloader.status()["errors"][0]
        assert reloader.status()["serving_version"] == initial.version

    asyncio.run(scenario())
