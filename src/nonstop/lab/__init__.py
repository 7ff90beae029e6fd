"""nonstop.lab: a network-namespace testbed (hosts, channels, processes, faults).

    from nonstop.lab import Lab, Topology

    topo = Topology()
    topo.channel("lan", v4="10.77.0.0/24", v6="fd77::/64")
    topo.host("a", channels={"lan": 11})
    topo.host("b", channels={"lan": 12})
    with Lab(topo) as lab:
        lab.host("a").sh(f"ping -c1 {lab.host('b').addr('lan')}")

Layout: a switch namespace ``<prefix>-sw`` with one bridge per channel; one namespace
``<prefix>-<host>`` per host, joined to each channel by a veth named after the channel. Addresses
only in 10.77.0.0/16 and fd77::/16; MACs are 02:77:<channel>:<host number>:<host index>.

Sysctls set in every host namespace (nsops.HOST_SYSCTLS): accept_dad=0 and accept_ra=0 (IPv6
addresses usable at once, no RA noise), keep_addr_on_down=1 (IPv6 addresses survive a link going
admin-down, like IPv4), arp_notify=1 (gratuitous ARP on link up / address change), arp_ignore=1 and
arp_announce=2 (no ARP flux across a host's channels; the usual setting for VIP hosts). The switch
namespace has IPv6 disabled: it only bridges. Bridges have multicast snooping off, so IPv6
neighbour discovery and multicast heartbeats reach every port.

Teardown always runs: ``Lab.__exit__``, atexit, SIGINT/SIGTERM handlers, and a state file per lab
in /run/nonstop-lab/ so ``Lab.sweep_stale()`` / ``nonstop lab down`` remove labs whose owner died.
"""

from nonstop.lab.faults import Fault
from nonstop.lab.host import LabError, LabHost
from nonstop.lab.lab import Lab
from nonstop.lab.process import LabProcess
from nonstop.lab.topology import Channel, HostSpec, Topology, demo_topology

__all__ = [
    "Channel",
    "Fault",
    "HostSpec",
    "Lab",
    "LabError",
    "LabHost",
    "LabProcess",
    "Topology",
    "demo_topology",
]
