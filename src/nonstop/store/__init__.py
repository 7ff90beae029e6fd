"""nonstop.store: mastership of many service groups decided by a store (etcd), like Patroni.

- :mod:`nonstop.store.base`: ``AbstractStore`` (timing-critical vs compare-and-set calls).
- :mod:`nonstop.store.etcd`: ``EtcdStore`` (etcd v3 JSON gateway, aiohttp).
- :mod:`nonstop.store.embedded`: ``EmbeddedStore``, today's pair (heartbeats + witness lease).
- :mod:`nonstop.store.core`: ``GroupsCore``, the sans-IO decisions (failsafe included).
- :mod:`nonstop.store.daemon`: ``GroupsAgent``, the node agent; :mod:`nonstop.store.cli`.
See docs/store.md.
"""

from nonstop.store.base import (
    AbstractStore,
    ClusterView,
    GroupRecord,
    SessionLost,
    StoreUnavailable,
    Switchover,
)

__all__ = [
    "AbstractStore",
    "ClusterView",
    "GroupRecord",
    "SessionLost",
    "StoreUnavailable",
    "Switchover",
]
