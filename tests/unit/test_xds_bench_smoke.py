"""bench/xds_bench.py still measures something real: 2 simulated Envoys get one edit."""

from __future__ import annotations

from bench.xds_bench import measure


def test_every_client_acks_the_edited_routes() -> None:
    cell = measure(clients=2, routes=5, repeat=1, timeout=15.0)

    assert cell.error is None
    assert cell.synced == 2
    [edit] = cell.edits
    # Every client ACKed an RDS response carrying the edited prefix …
    assert edit.converged == 2
    assert edit.converge_s is not None
    assert edit.converge_s > 0
    assert "rds" in edit.changed
    # … whose version is new and the same for both.
    assert len(edit.rds_acked) == 2
    assert None not in edit.rds_before
    assert len(set(edit.rds_acked)) == 1
    assert edit.rds_acked[0] not in edit.rds_before
    # The server pushed something for the edit and its RSS was read.
    assert edit.client_responses >= 2
    assert edit.hwm_mb >= edit.rss_mb > 0
