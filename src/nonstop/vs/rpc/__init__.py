"""RPC with fault-tolerance modes: ``@rpc.method`` on workers, a client, the manager on the front.

from nonstop.vs.rpc import RpcWorker, RpcClient
"""

from nonstop.vs.rpc.client import ConnectionLost, RpcClient, RpcConnection, RpcError
from nonstop.vs.rpc.core import Decision, NoMajority, choose_mode, vote
from nonstop.vs.rpc.frame import Call, FrameDecoder, Reply
from nonstop.vs.rpc.worker import RpcWorker

__all__ = [
    "Call",
    "ConnectionLost",
    "Decision",
    "FrameDecoder",
    "NoMajority",
    "Reply",
    "RpcClient",
    "RpcConnection",
    "RpcError",
    "RpcWorker",
    "choose_mode",
    "vote",
]
