"""EtcdStore: etcd v3 (3.4 from Debian) through its JSON gateway (``/v3/...``) with aiohttp.

Why not a gRPC client: aetcd 1.0 works against etcd 3.4 here (lease, txn, watch checked), but one
client talks to one member and has one integer-seconds timeout for every call. A master's
keep-alive needs a sub-second deadline and must not wait on a dead or minority member, so this
backend sends the timing-critical keep-alive to every endpoint at once (first answer wins; a
minority member cannot answer: lease renewal needs the leader), and every other call to one
endpoint at a time, moving on when it fails. No new dependency (aiohttp is already used).

Keys under ``/nonstop/<cluster>/``: ``members/<node>`` and ``groups/<G>/master`` (value: node
id, on the node's lease), ``groups/<G>/switchover`` (value: target node, no lease).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from nonstop.store.base import (
    AbstractStore,
    ClusterView,
    GroupRecord,
    SessionLost,
    StoreUnavailable,
    Switchover,
)


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def unb64(s: str) -> str:
    return base64.b64decode(s).decode()


def prefix_end(prefix: str) -> str:
    """The range_end that selects every key starting with ``prefix``."""
    raw = prefix.encode()
    return b64(raw[:-1] + bytes([raw[-1] + 1]))


class EtcdStore(AbstractStore):
    def __init__(
        self,
        endpoints: list[str],
        *,
        cluster: str,
        node: str,
        timeout: float = 1.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.node = node
        self.prefix = f"/nonstop/{cluster}/"
        self.timeout = timeout
        self.session: int | None = None
        self.ttl = 0.0
        self._current = 0
        self._http: aiohttp.ClientSession | None = None

    # -- plumbing -------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=8, force_close=False)
            )
        return self._http

    async def _post_one(self, endpoint: str, path: str, body: dict[str, Any], t: float) -> Any:
        try:
            async with self.http.post(
                endpoint + path, json=body, timeout=aiohttp.ClientTimeout(total=t)
            ) as r:
                data = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as e:
            raise StoreUnavailable(f"{endpoint}{path}: {type(e).__name__}: {e}") from None
        if not isinstance(data, dict):
            raise StoreUnavailable(f"{endpoint}{path}: not a JSON object")
        if "error" in data or ("code" in data and "header" not in data):
            msg = str(data.get("message") or data.get("error"))
            if "lease not found" in msg:
                raise SessionLost(msg)
            raise StoreUnavailable(f"{endpoint}{path}: {msg}")
        return data

    async def _call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """One endpoint at a time, from the last one that worked; the whole call within
        ``timeout`` (half of what is left for each try, at least 50 ms)."""
        end = time.monotonic() + (timeout or self.timeout)
        errors = []
        n = len(self.endpoints)
        for i in range(n):
            left = end - time.monotonic()
            if left <= 0:
                break
            idx = (self._current + i) % n
            t = left if i == n - 1 else max(0.05, left / 2)
            try:
                data = await self._post_one(self.endpoints[idx], path, body, t)
            except SessionLost:
                raise
            except StoreUnavailable as e:
                errors.append(str(e))
                continue
            self._current = idx
            return data
        raise StoreUnavailable("; ".join(errors) or f"{path}: no time left")

    async def _race(self, path: str, body: dict[str, Any], deadline: float) -> Any:
        """Every endpoint at once; the first good answer wins, the rest are cancelled."""
        t = max(0.001, deadline - time.monotonic())
        tasks = [asyncio.ensure_future(self._post_one(e, path, body, t)) for e in self.endpoints]
        errors: list[str] = []
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    return await fut
                except SessionLost:
                    raise
                except StoreUnavailable as e:
                    errors.append(str(e))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        raise StoreUnavailable("; ".join(errors))

    # -- plain ----------------------------------------------------------------------------
    async def open_session(self, ttl: float) -> int:
        data = await self._call("/v3/lease/grant", {"TTL": max(1, round(ttl))})
        self.session, self.ttl = int(data["ID"]), float(data["TTL"])
        return self.session

    async def register_member(self) -> None:
        assert self.session is not None
        body = {
            "key": b64(self._key("members", self.node)),
            "value": b64(self.node),
            "lease": str(self.session),
        }
        await self._call("/v3/kv/put", body)

    async def read(self) -> ClusterView:
        body = {"key": b64(self.prefix), "range_end": prefix_end(self.prefix)}
        data = await self._call("/v3/kv/range", body)
        rev = int(data["header"]["revision"])
        groups: dict[str, GroupRecord] = {}
        members: dict[str, int] = {}
        switch: dict[str, Switchover] = {}
        for kv in data.get("kvs", []):
            parts = unb64(kv["key"])[len(self.prefix) :].split("/")
            value = unb64(kv.get("value", ""))
            lease, mod = int(kv.get("lease", 0)), int(kv.get("mod_revision", 0))
            if len(parts) == 2 and parts[0] == "members":
                members[parts[1]] = lease
            elif len(parts) == 3 and parts[0] == "groups" and parts[2] == "master":
                groups[parts[1]] = GroupRecord(parts[1], value, lease, mod)
            elif len(parts) == 3 and parts[0] == "groups" and parts[2] == "switchover":
                switch[parts[1]] = Switchover(parts[1], value, mod)
        return ClusterView(rev, groups, members, switch)

    async def lease_ttl(self, lease: int) -> float | None:
        """Seconds the lease has left (LeaseTimeToLive), None if it is gone."""
        data = await self._call("/v3/lease/timetolive", {"ID": str(lease)})
        ttl = int(data.get("TTL", 0))  # proto3 JSON leaves a zero out; -1: the lease is gone
        return None if ttl < 0 else float(ttl)

    async def watch(self) -> AsyncIterator[int]:  # type: ignore[override]
        body = {"create_request": {"key": b64(self.prefix), "range_end": prefix_end(self.prefix)}}
        endpoint = self.endpoints[self._current]
        try:
            async with self.http.post(
                endpoint + "/v3/watch", json=body, timeout=aiohttp.ClientTimeout(total=None)
            ) as r:
                buf = ""
                dec = json.JSONDecoder()
                async for chunk in r.content.iter_any():
                    buf += chunk.decode()
                    while True:
                        buf = buf.lstrip()
                        if not buf:
                            break
                        try:
                            obj, end = dec.raw_decode(buf)
                        except ValueError:
                            break
                        buf = buf[end:]
                        res = obj.get("result") if isinstance(obj, dict) else None
                        if not isinstance(res, dict):
                            return
                        if res.get("events"):
                            yield int(res["header"]["revision"])
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise StoreUnavailable(f"watch on {endpoint}: {e}") from None

    async def request_switchover(self, group: str, target: str) -> None:
        body = {"key": b64(self._key("groups", group, "switchover")), "value": b64(target)}
        await self._call("/v3/kv/put", body)

    # -- timing-critical --------------------------------------------------------------------
    async def keepalive(self, deadline: float) -> float:
        if self.session is None:
            raise SessionLost("no session")
        data = await self._race("/v3/lease/keepalive", {"ID": str(self.session)}, deadline)
        res = data.get("result", data)
        ttl = int(res.get("TTL", 0))
        if ttl <= 0:
            raise SessionLost(f"lease {self.session} expired")
        return float(ttl)

    # -- compare-and-set ----------------------------------------------------------------------
    async def acquire(self, group: str) -> int | None:
        assert self.session is not None
        key = b64(self._key("groups", group, "master"))
        body = {
            "compare": [
                {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            ],
            "success": [
                {"request_put": {"key": key, "value": b64(self.node), "lease": str(self.session)}}
            ],
        }
        data = await self._call("/v3/kv/txn", body)
        if not data.get("succeeded"):
            return None
        return int(data["header"]["revision"])

    async def _delete_if(self, key: str, revision: int) -> bool:
        k = b64(key)
        body = {
            "compare": [
                {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
            ],
            "success": [{"request_delete_range": {"key": k}}],
        }
        data = await self._call("/v3/kv/txn", body)
        return bool(data.get("succeeded"))

    async def release(self, group: str, revision: int) -> bool:
        return await self._delete_if(self._key("groups", group, "master"), revision)

    async def clear_switchover(self, group: str, revision: int) -> bool:
        return await self._delete_if(self._key("groups", group, "switchover"), revision)

    async def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(StoreUnavailable):
                await self._call("/v3/lease/revoke", {"ID": str(self.session)}, timeout=0.5)
            self.session = None
        if self._http is not None:
            await self._http.close()
            self._http = None
