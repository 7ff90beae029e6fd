"""nonstop.app: the application side of session takeover (seed 001's prefixed socket API).

A service uses ``ns_listen/ns_accept/ns_recv/ns_send/commit/ns_close`` instead of the plain socket
calls; the library tells the node agent what the service has consumed and produced on every
connection, so the agent can keep the connection alive across a crash and hand it back.

Sync (``nonstop.app.api``)::

    lst = ns_listen("0.0.0.0", 7000, agent="/run/nonstop/app.sock")   # agent=None: no agent
    for conn, rec in lst.adopted():     # after a restart/failover: (NsConn, CommitRecord)
        ...                             # rec.read_pos, rec.write_pos, rec.state
    conn = lst.ns_accept()
    data = conn.ns_recv(4096)           # b"" at EOF
    conn.ns_send(reply)
    conn.commit(state, upto=None)       # state <= 255 bytes; upto: absolute read position
    conn.ns_close()                     # deliberate: the peer sees a FIN

asyncio (``nonstop.app.aio``): ``await ns_listen(...)``, ``await lst.ns_accept()``,
``await lst.adopted()``, ``await conn.ns_recv(n)``, ``await conn.ns_send(b)``,
``await conn.commit(state)``, ``await conn.ns_close()``.

Positions are byte counts since the connection opened: ``read_pos`` (consumed = committed),
``delivered`` (handed to the app by ns_recv), ``write_pos`` (sent).

Reading: ``ns_recv`` peeks (MSG_PEEK) past the bytes already delivered, with SO_RCVLOWAT set to
``pending + 1`` so a blocking peek (or poll(), for asyncio) waits for a new byte instead of
returning the pending ones again; EOF is the peer's FIN seen in TCP_INFO's state. ``commit()``
first sends COMMIT to the agent, then really reads and discards the bytes up to ``upto``. Bytes not
committed stay in the kernel receive queue: a crashed service loses nothing.

The channel (``nonstop.app.channel``): a unix stream socket, frames ``len u32 | nfds u8 | msgpack``
(msgspec tagged structs). REGISTER(conn_id, local, remote) passes the accepted socket's fd with
SCM_RIGHTS, so the agent holds a duplicate and a dying process never closes the connection in the
kernel. COMMIT(conn_id, read_pos, write_pos, state). CLOSE(conn_id, deliberate=True) on ns_close:
the agent closes its duplicate too, so the close is real. ADOPT_REQUEST(port) from
``adopted()``; the agent answers ADOPT(conn_id, local, remote, record) + fd per orphaned connection
(owner process gone) and ADOPT_DONE(count). If a service died after sending COMMIT but before
consuming, the agent discards the difference before the handover (TCP_INFO bytes_received minus
FIONREAD gives the kernel's read position), so the new process reads from exactly the committed
point. Malformed input either way raises RemoteProtocolError at the edge.

The agent embeds ``channel.AgentEndpoint(path)``: serve it with ``step(timeout)`` or
``attach(loop)``; ``add(conn_id, sock, record)`` holds a socket restored by TCP_REPAIR after a
failover (its queue starts at ``record.read_pos``); ``conns`` maps conn_id -> HeldConn (sock,
4-tuple, last CommitRecord, owner); ``adopt_all(client, port=)`` hands orphans back.
"""

from nonstop.app.api import NsConn, NsListener, ns_listen
from nonstop.app.channel import AgentEndpoint, CommitRecord

__all__ = ["AgentEndpoint", "CommitRecord", "NsConn", "NsListener", "ns_listen"]
