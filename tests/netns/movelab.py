"""The lab of the tests that move one connection by hand (test_repair, test_kick): a peer (.1)
and two nodes, a (.11) and b (.12), on one channel with IPv4 and IPv6."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nonstop.lab import Lab, Topology


def topology() -> Topology:
    topo = Topology(source="<repair>")
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.host("peer", channels={"lan": 1})
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return topo


@pytest.fixture(name="lab")
def movelab_lab(lab_factory: Callable[..., Lab]) -> Lab:
    """This lab, for a test module that imports this fixture."""
    return lab_factory(topology())
