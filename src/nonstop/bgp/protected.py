"""The speaker as a protected service of the nonstop agent: its BGP sessions survive a takeover
by ANOTHER node (the agent moves the TCP connections with TCP_REPAIR, the journal moves the
speaker's state).

One speaker process per node, both started the same way (``nonstop bgp speaker --config`` with
``agent``, ``key_file``, ``journal_listen``, ``journal_peer``). Each listens on the VIP through the
prefixed socket API and asks its agent for adopted connections: on the master node the answer
comes at once and the speaker runs (fresh, or after a takeover); on a backup node it comes only
when that node is promoted, and meanwhile the speaker follows the master's journal
(``remote.JournalFollower``) and stays hot.

The rules that keep the peer's view intact (docs/bgp.md, "Takeover to another node"):

- input: bytes are peeked, journaled, fed to the speaker, and consumed (committed to the agent,
  ``read_pos``) only once the standby holds their journal record. The agent's ACK clamp keeps
  the peer's ACKs at what the backup node holds, so the restored receive queue starts at
  ``read_pos`` <= what the standby fed; the standby drops the difference (``skip``);
- output: bytes the speaker produced are written only once the standby holds every record that
  led to them, so whatever the peer may have received, the standby produced too; the commit's
  ``write_pos`` is what the kernel accepted; the restored connection's send position may be
  behind it (the backup's copy of sent bytes lags) and the standby sends from its retained tail;
- on promotion: never an OPEN; what the master never wrote, then a KEEPALIVE, at once.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import time
from collections import deque
from typing import Any

from nonstop.app.aio import AsyncNsConn, AsyncNsListener, ns_listen
from nonstop.app.channel import Close, Commit, CommitRecord
from nonstop.auth import load_key
from nonstop.bgp.aio import SpeakerService, _Conn, serve_until_signal, set_md5
from nonstop.bgp.config import SpeakerConfig
from nonstop.bgp.fsm import State
from nonstop.bgp.journal import ACKED, Journal
from nonstop.bgp.remote import (
    HistoryServer,
    JournalFollower,
    JournalServer,
    fetch_history,
    parse_addr,
)
from nonstop.bgp.speaker import Speaker

log = logging.getLogger("nonstop.bgp")
SIOCOUTQ = 0x5411
EXIT_DEPOSED = 3  # the agent took the sessions away (this node stepped down): restart as standby
FETCH_S = 5.0  # a speaker restarted on the master node waits this long for the standby's copy
ACKED_EVERY = 0.5  # seconds between ACKED journal records per connection
_STATE = struct.Struct("!QQ")  # journal records confirmed, speaker rx bytes fed


class _PConn(_Conn):
    """A peer connection under the agent: reads held until the standby confirms, writes held
    until the standby could have produced them, commits to the agent in between."""

    def __init__(self, svc: ProtectedSpeaker, peer: str, conn: AsyncNsConn,
                 record: CommitRecord, skip: int = 0) -> None:
        self.conn_id = conn.conn_id
        self.agent = conn.agent
        self.read_pos = record.read_pos  # consumed from the kernel, committed
        self.write_pos = record.write_pos  # accepted by the kernel
        self.skip = skip  # bytes the journal fed already: read and dropped
        self.pending: deque[tuple[int, int]] = deque()  # (journal seq, bytes) fed, unconsumed
        self.held: deque[tuple[int, bytes]] = deque()  # (journal seq, bytes) not yet written
        self.paused = False
        self.acked_at = 0.0
        self.committed = (record.read_pos, record.write_pos)
        super().__init__(svc, peer, conn.sock, False)

    def _sent(self, n: int) -> None:
        self.write_pos += n
        super()._sent(n)

    def _readable(self) -> None:
        if self.skip:
            if got := self._recv(min(self.skip, 1 << 20)):
                self.skip -= len(got)
                self.read_pos += len(got)
            return
        if self.pending:
            return
        self._peek(1 << 18)

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.svc.loop.remove_reader(self.sock.fileno())

    def unpause(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.svc.loop.add_reader(self.sock.fileno(), self._readable)

    def release(self, confirmed: int, now: float) -> None:
        """Write and consume what ``confirmed`` journal records cover; commit."""
        out = []
        while self.held and self.held[0][0] <= confirmed:
            out.append(self.held.popleft()[1])
        if out and not self.closed:
            self.write(b"".join(out))
        n = 0
        while self.pending and self.pending[0][0] <= confirmed:
            n += self.pending.popleft()[1]
        self.commit(self.read_pos + n, confirmed)
        if n and not self.closed:
            self.consume(n)
            self.read_pos += n
        if not self.pending:
            self.unpause()
        if now - self.acked_at >= ACKED_EVERY and not self.closed:
            self.acked_at = now
            buf = array.array("i", [0])
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, buf)
                sp = self.svc.speaker
                sp._j(ACKED, sp.peers[self.peer].index, now,
                      (self.write_pos - buf[0]).to_bytes(8, "big"))

    def commit(self, read_pos: int, seq: int) -> None:
        if (read_pos, self.write_pos) == self.committed or self.agent is None or self.closed:
            return
        self.committed = (read_pos, self.write_pos)
        state = _STATE.pack(seq, self.svc.speaker.peers[self.peer].session.rx_fed)
        with contextlib.suppress(OSError):  # the agent is gone: the worker silences us anyway
            self.agent.send(Commit(self.conn_id, read_pos, self.write_pos, state))

    def _writable(self) -> None:
        super()._writable()
        self.commit(self.committed[0], self.svc.confirmed())

    def close(self) -> None:
        """A session going down: whatever it produced goes out (its NOTIFICATION), then FIN."""
        if self.closed:
            return
        for _, data in self.held:
            self.out += data
        self.held.clear()
        super().close()
        self._forget()

    def _forget(self) -> None:
        if self.agent is not None:
            with contextlib.suppress(OSError):
                self.agent.send(Close(self.conn_id, deliberate=True))
            self.agent = None


class ProtectedSpeaker(SpeakerService):
    def __init__(self, cfg: SpeakerConfig, listener: AsyncNsListener, key: bytes, *,
                 speaker: Speaker | None = None) -> None:
        super().__init__(cfg, speaker=speaker)
        self.ns_listener = listener
        self.key = key
        self.server: JournalServer | None = None
        self.role_info: dict[str, Any] = {}
        self.stop = asyncio.Event()  # set when deposed: the process ends

    def confirmed(self) -> int:
        return self.server.confirmed if self.server is not None else 1 << 62

    def standbys(self) -> int:
        return self.server.following if self.server is not None else 0

    async def start_protected(self, journal: Journal, *, resumed: bool) -> None:
        self.server = JournalServer(self.key, parse_addr(self.cfg.journal_listen or ""),
                                    journal, self._release_all)
        if resumed:  # first the KEEPALIVEs (the peers' hold timers run), then the rest
            self._dispatch([])
            self.takeover_written_at = time.monotonic()
        t = self.loop.create_task(self._accept_loop())
        self._tasks.add(t)
        from nonstop.bgp.api import start_api

        self.api_runner = await start_api(self, self.cfg.api_socket)
        self._dispatch([] if resumed else self.speaker.start(self.now()))

    async def _accept_loop(self) -> None:
        while not self._closing:
            try:
                c = await self.ns_listener.ns_accept()
            except OSError as e:
                log.warning("accept: %s", e)
                await asyncio.sleep(0.1)
                continue
            peer = self.peer_by_address(c.getpeername()[0])
            ok = peer is not None and peer not in self.conns and \
                self.speaker.peers[peer].session.state.name in ("CONNECT", "ACTIVE")
            if not ok or peer is None:
                log.info("refusing connection from %s", c.getpeername()[0])
                await c.ns_close()
                continue
            self.attach(peer, c, CommitRecord(), new=True)

    def attach(self, peer: str, c: AsyncNsConn, record: CommitRecord, *, new: bool,
               skip: int = 0) -> None:
        conn = _PConn(self, peer, c, record, skip)
        self.conns[peer] = conn
        if new:
            self._dispatch(self.speaker.connection_made(peer, self.now(), c.sock.getsockname()[0]))

    def on_data(self, peer: str, data: bytes, conn: _Conn) -> None:
        assert isinstance(conn, _PConn)
        events = self.speaker.receive_data(peer, data, self.now())
        conn.pending.append((self.server.seq if self.server else 0, len(data)))
        conn.pause()
        self._dispatch(events)

    def on_lost(self, peer: str, conn: _Conn) -> None:
        if conn.aborted and self.deposed is None:
            self.depose(f"the connection to {peer} was taken away (ECONNABORTED: the agent's "
                        "session worker silenced it, this node no longer serves the VIP)")
        if self.deposed is not None:
            return
        if isinstance(conn, _PConn):
            conn._forget()
        super().on_lost(peer, conn)

    def depose(self, why: str) -> None:
        """This speaker no longer serves its sessions: another node has them (or will), and
        the peers saw no loss. Nothing of the end may reach the standby (it would replay the
        sessions down and could not continue them), so the journal server closes before
        anything else happens; nothing reaches the peers either (no Cease, no FIN: the
        sockets are only let go, the session worker silences them). The process then ends
        with EXIT_DEPOSED, for its supervisor to start it again as a standby."""
        self.deposed = why
        for c in list(self.conns.values()):  # first: closing the server releases held output
            c.detach()
            c.sock.close()  # the worker holds the socket too: no FIN from this close
        self.conns.clear()
        if self.server is not None:
            self.server.close()
        log.error("deposed: %s; journal closed, exiting for a restart as a standby", why)
        self.stop.set()

    def _flush(self) -> None:
        seq = self.server.seq if self.server is not None else 0
        for name, c in self.conns.items():
            data = self.speaker.data_to_send(name, journal=False)
            if data and isinstance(c, _PConn):
                c.held.append((seq, data))
        self._release_all()

    def _release_all(self) -> None:
        confirmed, now = self.confirmed(), self.now()
        for c in list(self.conns.values()):
            if isinstance(c, _PConn):
                c.release(confirmed, now)

    async def close(self) -> None:
        await super().close()
        if self.server is not None:
            self.server.close()
        self.ns_listener.close()

    def extra_summary(self) -> dict[str, Any]:
        s = self.server
        return {"role": "master", **self.role_info,
                "journal": None if s is None else {"records": s.seq, "confirmed": s.confirmed,
                                                   "following": s.following,
                                                   **s.counters}}


def _not_resumable(follower: JournalFollower, name: str | None, rec: CommitRecord) -> str:
    """Why the journal cannot continue the session on a connection restored at ``rec`` (the
    empty string: it can): the standby's replica must be Established, hold every byte the
    master read, and hold (as written or still to write) every byte the kernel took."""
    if name is None:
        return "no peer configured at that address"
    st = follower.standby
    s = st.speaker.peers[name].session
    if s.state != State.ESTABLISHED:
        return f"the journal has the session {s.state.name.lower()}"
    if s.rx_fed < rec.read_pos:
        return f"the journal has read {s.rx_fed} bytes, the commit {rec.read_pos}"
    extra = rec.write_pos - st.written[name]
    if not -len(st.tail[name]) <= extra <= len(s.out):
        return (f"the journal wrote {st.written[name]} bytes (tail {len(st.tail[name])}, "
                f"{len(s.out)} to write), the kernel took {rec.write_pos}")
    return ""


async def _gave_journal_back(listener: AsyncNsListener, follower: JournalFollower,
                             adopting: asyncio.Future[Any]) -> int:
    """The master's speaker, restarted on its node, took this standby's copy of the journal:
    its new journal goes on from there, and this standby must follow it from its first record.
    It ends (EXIT_DEPOSED) for its supervisor to start it again."""
    await asyncio.to_thread(follower.stop)
    log.warning("gave the journal back to the master's restarted speaker: exiting for a "
                "restart as a standby (it follows the new journal from its start)")
    agent = listener.agent
    if agent is not None:
        with contextlib.suppress(OSError):  # wakes the thread waiting for adoption
            agent.sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(BaseException):
        await adopting
    listener.close()
    return EXIT_DEPOSED


async def run_protected(cfg: SpeakerConfig) -> int:
    """``nonstop bgp speaker`` with ``agent`` set: a standby until this node serves the VIP,
    then the master (after a takeover: the same sessions, no OPEN). Returns the exit status:
    0 after SIGINT/SIGTERM, EXIT_DEPOSED when the agent took the connections away."""
    import nonstop.bgp.api  # noqa: F401  (imported now, not during the takeover)

    assert cfg.listen and cfg.agent and cfg.key_file and cfg.journal_peer
    key = load_key(cfg.key_file, field="key_file")
    listener = await ns_listen(cfg.listen, cfg.port, agent=cfg.agent, backlog=16)
    for pc in cfg.peers:  # TCP-MD5: the listener signs SYN-ACKs and checks SYNs; accepted
        if pc.md5_password:  # sockets inherit the key, the agent sets it on restored ones
            set_md5(listener.sock, pc.address, pc.md5_password)
    follower = JournalFollower(cfg, key, parse_addr(cfg.journal_peer)).start()
    loop = asyncio.get_running_loop()
    given_back = asyncio.Event()
    history = None
    if cfg.journal_listen:
        try:
            history = HistoryServer(key, parse_addr(cfg.journal_listen), follower,
                                    lambda: loop.call_soon_threadsafe(given_back.set))
        except OSError as e:  # a restart of the master's speaker here would reset the sessions
            log.error("the journal's copy is not served on %s: %s", cfg.journal_listen, e)
    print("standby: waiting for this node to serve the VIP", flush=True)
    adopting = asyncio.ensure_future(listener.adopted())
    gave = asyncio.ensure_future(given_back.wait())
    await asyncio.wait({adopting, gave}, return_when=asyncio.FIRST_COMPLETED)
    gave.cancel()
    if history is not None:
        await asyncio.to_thread(history.close)  # its port is the journal server's now
    if not adopting.done():
        return await _gave_journal_back(listener, follower, adopting)
    adopted = adopting.result()
    t_adopted = time.monotonic()
    await asyncio.to_thread(follower.stop)
    source = "followed"
    if adopted and not follower.history and follower.apply_error is None:
        # connections at once and no master to follow: this node served already, and this
        # speaker was started again here (the last one died alone; the agent kept the
        # connections). The standby on the other node has the journal.
        got = await asyncio.to_thread(fetch_history, cfg, key, parse_addr(cfg.journal_peer),
                                      FETCH_S)
        if got is None:
            log.error("no whole journal from the standby at %s within %.0f s", cfg.journal_peer,
                      FETCH_S)
        else:
            follower, source = got, "the standby's copy"
    t_applied = time.monotonic()
    info: dict[str, Any] = {"adopted_at": t_adopted, "connections": len(adopted),
                            "records": len(follower.history), "resets": 0,
                            "journal_ended": follower.ended, "journal": source}
    if follower.history and follower.apply_error is None:
        sp = follower.standby.speaker
        journal = Journal(sp, history=follower.history)  # the takeover is journaled too
        svc = ProtectedSpeaker(cfg, listener, key, speaker=sp)
        now = svc.now()
        taken: dict[str, tuple[AsyncNsConn, CommitRecord, int]] = {}
        written: dict[str, int] = {}
        for conn, rec in adopted:
            if conn.stream_pos != rec.write_pos:  # the restored stream holds bytes written
                # after the last commit: the kernel accepted up to there (our write_pos)
                rec = CommitRecord(rec.read_pos, conn.stream_pos, rec.state)
            name = svc.peer_by_address(conn.getpeername()[0])
            why = "a second connection" if name in taken else _not_resumable(follower, name, rec)
            if why or name is None:
                log.warning("cannot continue %s (read %d, write %d; %d records applied): %s; "
                            "closing it", name or conn.getpeername()[0], rec.read_pos,
                            rec.write_pos, len(follower.history), why)
                info["resets"] += 1
                await conn.ns_close()
                continue
            skip = sp.peers[name].session.rx_fed - rec.read_pos
            taken[name] = (conn, rec, skip)
            written[name] = rec.write_pos
            info.setdefault("resent", {})[name] = follower.standby.written[name] - rec.write_pos
        for p in sp.by_index:  # sessions the journal has but no connection came back for
            if p.session.state == State.ESTABLISHED and p.name not in taken:
                info["resets"] += 1
                sp.connection_lost(p.name, now)
        resumed = follower.standby.resume(now, written)
        for name, (conn, rec, skip) in taken.items():
            svc.attach(name, conn, rec, new=False, skip=skip)
        await svc.start_protected(journal, resumed=True)
        info.update(resumed=[r.peer for r in resumed], resumed_at=svc.takeover_written_at,
                    applied_ms=round((t_applied - t_adopted) * 1000, 3),
                    skipped={n: v[2] for n, v in taken.items()})
        svc.takeover = info
        log.warning("took over %d session(s) from the journal (%d records)", len(resumed),
                    len(follower.history))
    else:
        if adopted:
            log.warning("%d connection(s) adopted without a journal to continue them: closed",
                        len(adopted))
        for conn, _ in adopted:
            info["resets"] += 1
            await conn.ns_close()
        svc = ProtectedSpeaker(cfg, listener, key)
        journal = Journal(svc.speaker)
        await svc.start_protected(journal, resumed=False)
        if adopted:
            svc.takeover = info
    print("serving", flush=True)
    await serve_until_signal(svc.close, svc.stop)
    return EXIT_DEPOSED if svc.deposed is not None else 0
