#!/bin/bash
# Deliveries per CPU-second, bench:fan with and without history, one core, release.
cd /work/wt-history
N=${N:-2000}; M=${M:-300}
for round in 1 2 3; do
for mode in none kept; do
  PORT=$(python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])")
  extra=""; [ $mode = kept ] && extra="--bench-history"
  target/release/ringcast serve --dev --listen 127.0.0.1:$PORT --cores 1 $extra > results/history-2026-12-01/cost-srv.log 2>&1 &
  SPID=$!
  sleep 1
  target/release/ringcast-loadgen --server-pid $SPID --sources 8 --json results/history-2026-12-01/cost-$mode-$round.json fanout --url ws://127.0.0.1:$PORT -n $N -m $M --topic bench:fan > results/history-2026-12-01/cost-$mode-$round.txt 2>&1
  kill $SPID; wait $SPID 2>/dev/null
  python3 - $mode $round <<'PY'
import json,sys
mode,rnd=sys.argv[1],sys.argv[2]
r=json.load(open(f'results/history-2026-12-01/cost-{mode}-{rnd}.json'))
def find(d,k):
    if isinstance(d,dict):
        for kk,v in d.items():
            if kk==k: return v
            x=find(v,k)
            if x is not None: return x
    return None
cpu=find(r,'cpu_secs_publish'); per=find(r,'cpu_us_per_delivery'); lost=find(r,'lost'); dl=find(r,'delivered')
print(mode, rnd, 'cpu_us_per_delivery', per, 'deliveries/cpu-s', (1e6/per if per else None), 'cpu_s', cpu, 'lost', lost, 'delivered', dl)
PY
done
done
