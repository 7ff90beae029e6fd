#!/usr/bin/env bash
# The standard failover benchmark set: nonstop vs keepalived (VRRPv3) in the same netns lab,
# 10 ms interval, 20 SIGKILLs of the master's process, 20 isolations of the master's node, and a
# 60 s soak under CPU hogs and 5 % heartbeat loss. Writes bench/results/*.json. Needs root.
#   bench/run.sh [RUNS] [SOAK_SECONDS]        (BENCH_ARGS="--no-witness" adds options to every run)
set -euo pipefail
cd "$(dirname "$0")/.."
NONSTOP=${NONSTOP:-.venv/bin/nonstop}
RUNS=${1:-20}
SOAK=${2:-60}
OUT=bench/results
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
mkdir -p "$OUT"
for fault in kill node; do
    "$NONSTOP" bench failover --runs "$RUNS" --interval-ms 10 --fault "$fault" \
        --baseline keepalived --format json --out "$OUT/failover-$fault-10ms.json" "${EXTRA[@]}" \
        >/dev/null
    echo "wrote $OUT/failover-$fault-10ms.json" >&2
done
"$NONSTOP" bench failover --runs 0 --soak "$SOAK" --interval-ms 10 \
    --baseline keepalived --format json --out "$OUT/failover-soak-10ms.json" "${EXTRA[@]}" \
    >/dev/null
echo "wrote $OUT/failover-soak-10ms.json" >&2
.venv/bin/python - "$OUT" <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("failover-*.json")):
    r = json.loads(p.read_text())
    b = r.get("baseline") or {}
    d, bd = r["detect_ms"], (b.get("detect_ms") or {})
    print(f"{p.name}: nonstop detect p50/p99 {d['p50']}/{d['p99']} ms, "
          f"keepalived {bd.get('p50')}/{bd.get('p99')} ms, ratio {r['ratio_p50']}, "
          f"false failovers {r['false_failovers']}/{b.get('false_failovers')}, "
          f"dual masters {r['dual_masters']}/{b.get('dual_masters')}")
PY
