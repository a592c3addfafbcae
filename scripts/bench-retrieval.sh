#!/usr/bin/env bash
# Benchmark the built-in retrieval server: index build time on a synthetic 10k-passage corpus,
# then a bounded load test (8 concurrent keep-alive clients, single-query requests, a fixed
# request count and a time cap) over loopback. Prints requests/s, p50 and p99 latency.
#
# Usage: scripts/bench-retrieval.sh [PASSAGES] [REQUESTS] [CLIENTS]
# Env:   CARGO_TARGET_DIR (where the release binary is built), BENCH_TIME_CAP (seconds, default 60),
#        MEMGEN_BIN (benchmark this memgen binary instead of building one: to compare two builds
#        side by side under the same machine load)
# Needs: cargo, python3 (standard library only).
set -euo pipefail

PASSAGES=${1:-10000}
REQUESTS=${2:-4000}
CLIENTS=${3:-8}
TIME_CAP=${BENCH_TIME_CAP:-60}

cd "$(dirname "$0")/.."
if [[ -n "${MEMGEN_BIN:-}" ]]; then
    BIN=$MEMGEN_BIN
    [[ -x "$BIN" ]] || { echo "MEMGEN_BIN=$BIN is not an executable file" >&2; exit 1; }
else
    TARGET_DIR=${CARGO_TARGET_DIR:-target}
    cargo build --release --locked --quiet
    BIN="$TARGET_DIR/release/memgen"
fi

WORK=$(mktemp -d -t memgen-bench-XXXXXX)
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== generating $PASSAGES synthetic passages"
python3 - "$PASSAGES" "$WORK/corpus.jsonl" "$WORK/queries.txt" <<'EOF'
import json, random, sys
n, corpus_path, queries_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rng = random.Random(1234)
syll = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "qui", "bar", "ne", "zu", "fi", "ths", "ol", "pra", "gen"]
vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(30000)})
rng.shuffle(vocab)
# Zipf-ish word frequencies, like real text.
weights = [1.0 / (i + 1) ** 1.05 for i in range(len(vocab))]
queries = []
with open(corpus_path, "w") as f:
    for i in range(n):
        title = " ".join(w.capitalize() for w in rng.sample(vocab[500:], rng.randint(1, 3)))
        body = " ".join(rng.choices(vocab, weights, k=rng.randint(80, 120)))
        f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{title} {body}'}) + "\n")
        if i % 5 == 0:
            # A question naming the title plus a few common words.
            queries.append(f"what is {title} {' '.join(rng.choices(vocab[:200], k=3))}?")
with open(queries_path, "w") as f:
    f.write("\n".join(queries) + "\n")
EOF
ls -l "$WORK/corpus.jsonl" | awk '{printf "corpus: %.1f MB\n", $5 / 1e6}'

start_server() {
    "$BIN" retriever serve --corpus "$WORK/corpus.jsonl" --index "$WORK/index" --port 0 2>"$WORK/server.log" &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if grep -q "listening on" "$WORK/server.log"; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then cat "$WORK/server.log"; echo "server died" >&2; exit 1; fi
        sleep 0.1
    done
    echo "server did not start within 60 s" >&2; exit 1
}

echo "== index build"
start_server
grep "memgen retriever:" "$WORK/server.log" | sed 's/^/  /'
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
echo "== restart (index reused)"
start_server
grep "memgen retriever:" "$WORK/server.log" | sed 's/^/  /'
URL=$(sed -n 's/.*listening on \(http[^ ]*\).*/\1/p' "$WORK/server.log" | head -1)

echo "== load: $REQUESTS single-query requests, $CLIENTS concurrent clients, cap ${TIME_CAP}s"
python3 - "$URL" "$WORK/queries.txt" "$REQUESTS" "$CLIENTS" "$TIME_CAP" <<'EOF'
import http.client, json, sys, threading, time, urllib.parse
url, qpath, total, clients, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
u = urllib.parse.urlparse(url)
queries = [q for q in open(qpath).read().splitlines() if q]
lock = threading.Lock()
next_i = [0]
lat, errors, hits_ok = [], [], [0]
deadline = time.perf_counter() + cap

def worker():
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    mine, ok = [], 0
    while True:
        with lock:
            i = next_i[0]
            next_i[0] += 1
        if i >= total or time.perf_counter() > deadline:
            break
        q = queries[i % len(queries)]
        body = json.dumps({"queries": [q], "topk": 3, "return_scores": True})
        t0 = time.perf_counter()
        try:
            conn.request("POST", u.path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                continue
            res = json.loads(data)["result"]
            mine.append(dt)
            # The question names a title: its passage should rank first.
            title = q[len("what is "):].rsplit(" ", 3)[0]
            if res[0] and res[0][0]["document"]["contents"].startswith(f'"{title}"'):
                ok += 1
        except Exception as e:  # count, reconnect, go on
            errors.append(repr(e))
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.close()
    with lock:
        lat.extend(mine)
        hits_ok[0] += ok

t0 = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
wall = time.perf_counter() - t0
lat.sort()
pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000 if lat else float("nan")
print(f"requests: {len(lat)} ok, {len(errors)} errors in {wall:.2f}s" + (f" (first error: {errors[0]})" if errors else ""))
print(f"throughput: {len(lat) / wall:.0f} req/s")
print(f"latency: p50 {pct(50):.2f} ms, p90 {pct(90):.2f} ms, p99 {pct(99):.2f} ms, max {lat[-1] * 1000 if lat else float('nan'):.2f} ms")
print(f"title passage ranked first: {hits_ok[0]}/{len(lat)}")
EOF
echo "== load average: $(uptime)"
