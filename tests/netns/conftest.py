"""Fixtures for tests that build their own network-namespace labs (nonstop.lab).

- ``lab_factory``: call with a Topology (and optionally prefix=...), get an up Lab; every lab it
  made is torn down after the test, also when the test fails, and teardown problems fail the test.
- ``demo_lab``: the demo topology (peer, node-a, node-b, witness; channels lan and hb).

Tests marked ``netns`` are skipped when not root or when ``ip netns`` is unusable. Labs left by a
killed earlier run (owner pid dead) are removed once at the start of the session.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nonstop.lab import Lab, Topology, demo_topology


def _why_no_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_no_netns()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("netns") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _sweep_stale_labs() -> None:
    if _why_no_netns() is None:
        Lab.sweep_stale()


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    reason = _why_no_netns()
    if reason is not None:  # also for tests that forgot the netns mark
        pytest.skip(reason)
    labs: list[Lab] = []

    def make(topology: Topology, prefix: str | None = None, **kwargs: Any) -> Lab:
        lab = Lab(topology, prefix=prefix, **kwargs)
        labs.append(lab)
        return lab.up()

    yield make
    problems = []
    for lab in reversed(labs):
        problems += [f"{lab.prefix}: {p}" for p in lab.down()]
    assert not problems, f"lab teardown left things behind: {problems}"


@pytest.fixture
def demo_lab(lab_factory: Callable[..., Lab]) -> Lab:
    return lab_factory(demo_topology())


def pair_topology(source: str = "<pair>") -> Topology:
    """Two hosts, a (.11) and b (.12), on one channel lan: 10.77.0.0/24 and fd77::/64."""
    topo = Topology(source=source)
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    return topo


@pytest.fixture
def lab(lab_factory: Callable[..., Lab]) -> Lab:
    """The pair topology, up; a test module may define its own ``lab`` instead."""
    return lab_factory(pair_topology())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item, so fixtures can tell in teardown that the test
    failed (and print the agents' logs)."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
