"""nonstop.vs: the virtual server (seeds 002 and 003), an HA front over a worker pool.

- ``pool``: the worker pool, its Active Stations Table (every worker on two channels), health
  states, passive ejection, draining, balancing policies (sans-IO).
- ``http``: a sans-IO HTTP/1.1 parser; ``proxy``: the reverse proxy with next-upstream retry.
- ``l4``: TCP relay with os.splice; ``control``: authenticated registration and heartbeats.
- ``health``: active checks; ``front``: the daemon; ``worker``: a demo worker process.
- ``rpc``: frames, worker API, client, and the manager's fault-tolerance modes (P/B, NVP, DRB,
  adaptive).

See docs/vs.md.
"""
