"""nonstop.bgp: a BGP-4 speaker whose sessions survive a takeover (issue 5).

Layers, each sans-IO: wire.py (framing, OPEN/KEEPALIVE/NOTIFICATION/ROUTE-REFRESH), attrs.py (path
attributes, RFC 7606), nlri.py (prefixes as ints), update.py (UPDATE), fsm.py (RFC 4271 session),
rib.py + policy.py + speaker.py (RIBs, decision, policy), journal.py (hot standby). aio.py is the
asyncio adapter, api.py the operator interface, cli.py the ``nonstop bgp`` command.
"""

from nonstop.bgp.attrs import Action, Attrs
from nonstop.bgp.config import PeerConfig, SpeakerConfig
from nonstop.bgp.fsm import Session, SessionConfig, State
from nonstop.bgp.journal import Journal, Standby
from nonstop.bgp.speaker import PeerEvent, Speaker
from nonstop.bgp.wire import NotifyError

__all__ = [
    "Action",
    "Attrs",
    "Journal",
    "NotifyError",
    "PeerConfig",
    "PeerEvent",
    "Session",
    "SessionConfig",
    "Speaker",
    "SpeakerConfig",
    "Standby",
    "State",
]
