"""Failover: the role machine, the VIP adapter, the fence guard and the witness.

``roles`` and ``witness`` are sans-IO cores; ``vip``, ``guard`` and ``witness_cli`` are the thin
adapters around them (netlink, raw sockets, a guard process, asyncio UDP).
"""
