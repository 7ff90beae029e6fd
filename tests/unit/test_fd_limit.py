"""raise_fd_limit: thousands of protected connections need more fds than the usual 1024 (a
10,000-connection bench lost 6 connections to EMFILE in its peer's client)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys
from nonstop.common import raise_fd_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))
print(raise_fd_limit(3000), resource.getrlimit(resource.RLIMIT_NOFILE))
print(raise_fd_limit(2000), resource.getrlimit(resource.RLIMIT_NOFILE))  # never lowered
print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))
print(raise_fd_limit(10000), resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def _run() -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return out.stdout.splitlines()


def test_soft_limit_is_raised_to_what_is_asked_and_never_lowered() -> None:
    lines = _run()
    assert lines[0] == "3000 (3000, 4096)"
    assert lines[1] == "3000 (3000, 4096)"
    assert lines[2] == "4096 (4096, 4096)"


def _may_raise_hard_limit() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in our effective set (root in a container may lack it)."""
    with open("/proc/self/status") as f:
        eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return bool(int(eff, 16) >> 24 & 1)


def test_past_the_hard_limit_as_far_as_it_may_go() -> None:
    want = "10000 (10000, 10000)" if _may_raise_hard_limit() else "4096 (4096, 4096)"
    assert _run()[3] == want
