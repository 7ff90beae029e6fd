"""nonstop.session: TCP session takeover (dump/restore with TCP_REPAIR, sync to the backup)."""

from nonstop.session.repair import (
    RepairError,
    TcpState,
    close_silently,
    dump,
    dump_many,
    restore,
    restore_many,
)

__all__ = [
    "RepairError",
    "TcpState",
    "close_silently",
    "dump",
    "dump_many",
    "restore",
    "restore_many",
]
