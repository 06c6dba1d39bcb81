"""Client-side balancing: a target that resolves to several replicas (a headless Service through
dns:///, here a static ipv4: list) gets its calls spread over all of them, not pinned to one
connection as a ClusterIP Service would pin them."""

from __future__ import annotations

import re
from collections.abc import Callable

from o2u_client import Client
from tests.server_testing import RunningServer


def _calls(server: RunningServer, method: str) -> float:
    found = re.search(
        rf'^o2u_grpc_requests_total{{code="OK",method="{method}"}} (\S+)$', server.scrape(), re.MULTILINE
    )
    return float(found.group(1)) if found else 0.0


def test_calls_are_spread_over_every_resolved_replica(start_server: Callable[..., RunningServer]) -> None:
    replicas = [start_server(), start_server(), start_server()]
    target = "ipv4:" + ",".join(replica.address for replica in replicas)
    with Client(target, timeout=10) as client:
        for _ in range(30):
            assert list(client.list()) == []
    calls = [_calls(replica, "ListScoringJobs") for replica in replicas]
    assert all(count > 0 for count in calls), calls
    assert sum(calls) == 30


def test_a_dns_target_reaches_the_server(server: RunningServer) -> None:
    with Client(f"dns:///localhost:{server.port}", timeout=10) as client:
        assert client.healthy()
