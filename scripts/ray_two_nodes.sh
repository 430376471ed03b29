#!/usr/bin/env bash
# Two Ray nodes on this machine, both on 127.0.0.1: a head (`ray start --head`) and a second node
# (`ray start --address`), to try multi-node placement (`ray.address`: collection shards and PPO) without a
# second machine.
#   scripts/ray_two_nodes.sh start [PORT]   prints the address for ray.address (default port 6390)
#   scripts/ray_two_nodes.sh stop           stops exactly the processes these two nodes started
# Only this cluster's processes are stopped (found by its own temp dir), never other Ray clusters here.
# Keep RAY_TWO_NODES_DIR short: Ray's socket paths below it must stay under 108 bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PY=${PY:-.venv/bin/python}
STATE=${RAY_TWO_NODES_DIR:-/tmp/priorzero-ray-two-nodes}
export RAY_AUTH_MODE=disabled
case "${1:-}" in
start)
    PORT=${2:-6390}
    mkdir -p "$STATE"
    "$RAY" start --head --node-ip-address 127.0.0.1 --port "$PORT" --num-cpus 2 --include-dashboard false \
        --temp-dir "$STATE/tmp" --disable-usage-stats >"$STATE/head.log" 2>&1 || { tail -5 "$STATE/head.log" >&2; exit 1; }
    "$RAY" start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus 2 \
        --disable-usage-stats >"$STATE/worker.log" 2>&1 || { tail -5 "$STATE/worker.log" >&2; exit 1; }
    echo "127.0.0.1:$PORT" >"$STATE/address"
    echo "ray.address=127.0.0.1:$PORT"
    ;;
stop)
    # Every process of this cluster names its session under $STATE/tmp; their children go with them.
    "$PY" - "$STATE/tmp" <<'PY'
import sys, psutil
marker = sys.argv[1]
me = psutil.Process()
skip = {me.pid, *(p.pid for p in me.parents())}  # this script names the marker too
roots = [p for p in psutil.process_iter(["cmdline"])
         if p.pid not in skip and any(marker in part for part in (p.info["cmdline"] or []))]
procs = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}.values()
for p in procs:
    try:
        p.terminate()
    except psutil.NoSuchProcess:
        pass
_, alive = psutil.wait_procs(list(procs), timeout=15)
for p in alive:
    p.kill()
print(f"stopped {len(procs)} processes of the two-node cluster")
PY
    rm -f "$STATE/address"
    ;;
*)
    echo "usage: $0 start [PORT] | stop" >&2
    exit 2
    ;;
esac
