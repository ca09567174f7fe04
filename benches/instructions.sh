#!/usr/bin/env bash
# User-space instructions per proxied request, the gateway against nginx and against the least
# a proxy on the gateway's stack does (compare's hyper-proxy), counted by
# `valgrind --tool=callgrind`. Instruction counts do not drift with the machine's load as
# wall-clock figures do, so this is the judge for small request-path optimisations that the
# load comparison's noise (10-30% between rounds) would hide. Kernel work (the syscalls both
# proxies make alike) is not counted.
#
#   benches/instructions.sh [GATEWAY_BINARY]   (default target/release/gateway)
#   TARGETS="gateway-plugins nginx" benches/instructions.sh   (some of: gateway,
#       gateway-plugins, hyper-proxy, nginx; all four by default)
#
# Each proxy runs under callgrind twice: once started and stopped with a single request (its
# start-up cost), once under `wrk -c10` for 10 s; the difference divided by wrk's request
# count is the cost of one request. The upstream and the nginx settings are benches/compare's
# (no plugins, access log off, a keep-alive upstream pool); the request is a plain GET, without
# compare's credential headers, except for gateway-plugins: compare's key-auth + rate-limiting
# + jwt route, sent compare's `apikey` and `Authorization: Bearer` (HS256) headers. Needs
# valgrind, wrk, nginx, curl, python3 and the benchmark upstream (`cargo build --release -p
# gateway-benches --bin compare`). The callgrind files and logs stay in the directory the
# script prints, for callgrind_annotate.
set -euo pipefail

gateway=${1:-target/release/gateway}
compare=target/release/compare
for tool in valgrind wrk nginx curl python3 callgrind_annotate; do
    command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 2; }
done
[ -x "$gateway" ] || { echo "missing: $gateway (cargo build --release -p gateway)" >&2; exit 2; }
[ -x "$compare" ] || { echo "missing: $compare (cargo build --release -p gateway-benches --bin compare)" >&2; exit 2; }

dir=$(mktemp -d)
pids=()
echo "files: $dir"
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$compare" --serve-upstream 127.0.0.1:0 > "$dir/upstream.port" &
pids+=($!)
for _ in $(seq 50); do [ -s "$dir/upstream.port" ] && break; sleep 0.1; done
up=$(head -1 "$dir/upstream.port")

cat > "$dir/gateway.yaml" <<EOF
_format_version: "3.0"
services:
- name: upstream
  url: http://127.0.0.1:$up
  routes: [{name: all, paths: ["/"]}]
EOF
# compare's plugin configuration and credentials.
cp "$dir/gateway.yaml" "$dir/gateway-plugins.yaml"
cat >> "$dir/gateway-plugins.yaml" <<EOF
  plugins:
  - {name: key-auth}
  - {name: rate-limiting, config: {second: 1000000000, policy: local}}
  - {name: jwt}
consumers:
- username: bench
  keyauth_credentials: [{key: bench-key}]
  jwt_secrets: [{key: bench-iss, secret: bench-secret}]
EOF
token=$(python3 -c '
import base64, hashlib, hmac, json
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
head = b64(json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":")).encode())
body = b64(json.dumps({"iss": "bench-iss"}, separators=(",", ":")).encode())
sig = b64(hmac.new(b"bench-secret", head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())')
credentials=(-H "apikey: bench-key" -H "Authorization: Bearer $token")

# Starts proxy $1 ("gateway", "gateway-plugins", "hyper-proxy" or "nginx") under callgrind on
# port $2, writing $3; sets $pid.
start() {
    local what=$1 port=$2 out=$3
    if [ "$what" = hyper-proxy ]; then
        # The least a proxy on the gateway's stack does (see compare's `serve_hyper_proxy`).
        valgrind --tool=callgrind --callgrind-out-file="$out" "$compare" --serve-hyper-proxy "127.0.0.1:$port" \
            --proxy-to "127.0.0.1:$up" > "$out.log" 2>&1 &
    elif [ "$what" = gateway ] || [ "$what" = gateway-plugins ]; then
        valgrind --tool=callgrind --callgrind-out-file="$out" "$gateway" run --config "$dir/$what.yaml" \
            --listen "127.0.0.1:$port" --listen-tls off --admin-listen "127.0.0.1:$(free_port)" \
            --workers 1 --access-log off > "$out.log" 2>&1 &
    else
        cat > "$dir/nginx-$port.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $dir/nginx-$port.pid;
error_log $dir/nginx-$port.error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  upstream up { server 127.0.0.1:$up; keepalive 512; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$port;
    location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
        valgrind --tool=callgrind --callgrind-out-file="$out" nginx -p "$dir" -c "$dir/nginx-$port.conf" > "$out.log" 2>&1 &
    fi
    pid=$!
    pids+=("$pid")
    for _ in $(seq 300); do
        curl -fs -m 2 "${credentials[@]}" "http://127.0.0.1:$port/" > /dev/null && return
        sleep 0.1
    done
    echo "$what did not answer on port $port; see $out.log" >&2
    exit 1
}

# Ends proxy $1, pid $2, normally: callgrind writes its file at exit.
stop() {
    if [ "$1" = nginx ]; then kill -QUIT "$2"; else kill -INT "$2"; fi
    for _ in $(seq 300); do kill -0 "$2" 2>/dev/null || return 0; sleep 0.1; done
    echo "$1 did not exit within 30 s" >&2
    exit 1
}

total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }'; }

for what in ${TARGETS:-gateway gateway-plugins hyper-proxy nginx}; do
    port=$(free_port)
    start "$what" "$port" "$dir/$what.idle"
    stop "$what" "$pid"
    port=$(free_port)
    start "$what" "$port" "$dir/$what.load"
    sent=()
    [ "$what" = gateway-plugins ] && sent=("${credentials[@]}")
    wrk -t1 -c10 -d10s "${sent[@]}" "http://127.0.0.1:$port/" > "$dir/$what.wrk"
    requests=$(awk '/requests in/ { print $1 }' "$dir/$what.wrk")
    if [ -z "$requests" ] || grep -q "Non-2xx\|Socket errors" "$dir/$what.wrk"; then
        echo "$what: wrk failed or got errors; see $dir/$what.wrk" >&2
        exit 1
    fi
    stop "$what" "$pid"
    idle=$(total "$dir/$what.idle")
    load=$(total "$dir/$what.load")
    # The idle run answered one request, the load run one more than wrk's (the readiness probe).
    echo "$what: $(( (load - idle) / requests )) instructions per request ($requests requests)"
done
