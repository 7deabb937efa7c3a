"""The helpers of tests/fixtures/ray_cluster.py that need no Ray running (quick)."""

from __future__ import annotations

import re
import socket
import subprocess

from tests.fixtures.ray_cluster import (
    BIN,
    RAY_CLIENT_SPECIFIC_SERVER_PORTS,
    RAY_DEFAULT_PORTS,
    RAY_DEFAULT_WORKER_PORTS,
    HeadPorts,
    _ephemeral_range,
    free_ports,
    port_is_free,
)


def test_free_ports_are_distinct_free_and_clear_of_ray_and_the_kernel():
    first, second = free_ports(40), free_ports(40)
    ports = first + second
    assert len(set(ports)) == 80  # never handed out twice, within and across calls
    low, high = _ephemeral_range()
    for port in ports:
        assert not low <= port <= high
        assert port not in RAY_DEFAULT_PORTS.values()
        assert port not in RAY_DEFAULT_WORKER_PORTS and port not in RAY_CLIENT_SPECIFIC_SERVER_PORTS
        assert port_is_free(port)


def test_port_is_free_sees_a_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not port_is_free(sock.getsockname()[1])
    assert port_is_free(free_ports(1)[0])


def test_head_ports_cover_every_port_flag_of_ray_start():
    """Every `--*-port*` option of `ray start` is set by HeadPorts.flags() (a new one in a Ray
    upgrade fails here instead of binding a default port)."""
    help_text = subprocess.run(
        [str(BIN / "ray"), "start", "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    options = set(re.findall(r"^\s+(--[a-z-]*port[a-z-]*)", help_text, re.MULTILINE))
    options -= {"--worker-port-list"}  # the alternative to --min/--max-worker-port
    ports = HeadPorts(*range(21001, 21010))
    given = {flag.split("=")[0] for flag in ports.flags()}
    assert options and options <= given, options - given
