#!/usr/bin/env bash
# tun2socks with route.auto, in one command, on one machine, touching nothing outside two
# network namespaces that it creates and deletes again:
#
#   client namespace                         server namespace
#     tun2socks (route.auto) + curl    veth    Dante SOCKS5 server 10.200.0.2:1080
#     10.200.0.1/24, default via .2 <=======> 10.200.0.2/24
#                                              web server 10.201.0.80:8000 (on lo)
#
# curl in the client fetches the page; tun2socks has pointed every route into its TUN, so the
# connection goes through the SOCKS5 server (the web server sees the proxy's address), while
# the proxy connection itself keeps the original path. Then tun2socks stops and everything it
# changed is gone. A second round runs the bypass mode (proxy.url: direct://) with the SOCKS5
# server stopped: every flow leaves from a marked socket of tun2socks (route.mark), the web
# server sees the client's own address, and a `block` rule answers with a reset. Needs root, iproute2, curl, Dante (Debian: dante-server), python3 (for the
# web server) and tun2socks itself: the one the README's set-up command installed, found on
# PATH, or any other with TUN2SOCKS=/path/to/tun2socks. All of that is checked before anything
# is created.
#
#   sudo examples/netns-demo.sh          (DEMO_ID=NAME to choose the namespace suffix)
set -euo pipefail

ID="${DEMO_ID:-$$}"
CLI="t2sdemo-c-$ID"
SRV="t2sdemo-s-$ID"
TUN="t2sdemo0"
PROXY_IP=10.200.0.2
WEB_IP=10.201.0.80
T2S_PID=""

# --- prerequisites, all checked before anything is created; what is missing goes in one line
PATH="$PATH:/usr/sbin:/sbin"  # root's PATH under `su` lacks them; danted and ip live there
program() {  # its path, if it is an executable on PATH (bash may return one that is not)
  local found
  found="$(command -v "$1")" && [[ -x "$found" ]] && echo "$found"
}
problems=()
[[ $EUID -eq 0 ]] || problems+=("root (network namespaces; run it with sudo)")
for need in ip:iproute2 ss:iproute2 curl:curl danted:dante-server python3:python3; do
  program "${need%%:*}" >/dev/null || problems+=("${need%%:*} (Debian package ${need#*:})")
done
T2S="${TUN2SOCKS:-$(program tun2socks || true)}"
if [[ -z "$T2S" ]]; then
  problems+=("tun2socks (install it with the README's set-up command, or set TUN2SOCKS=/path/to/tun2socks)")
elif ! T2S_VERSION="$("$T2S" --version 2>&1)"; then
  problems+=("a working tun2socks ('$T2S --version' failed: $(tail -n 1 <<<"$T2S_VERSION"); run the README's set-up command, or set TUN2SOCKS)")
fi
if ((${#problems[@]})); then
  line=""
  for problem in "${problems[@]}"; do line+="${line:+; }$problem"; done
  echo "netns-demo.sh: missing: $line" >&2
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/t2sdemo.XXXXXX")"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ $rc -ne 0 ]]; then
    for log in tun2socks.log danted.log danted.out web.log; do
      [[ -s "$WORK/$log" ]] && { echo "-- $log (tail):"; tail -n 15 "$WORK/$log"; }
    done
  fi
  if [[ -n "$T2S_PID" ]] && kill -0 "$T2S_PID" 2>/dev/null; then
    kill -TERM "$T2S_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$T2S_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  for ns in "$CLI" "$SRV"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns"); do kill -TERM "$pid" 2>/dev/null || true; done
      sleep 0.3
      for pid in $(ip netns pids "$ns"); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$ns" || true
    fi
    rm -rf "/etc/netns/$ns"
  done
  rm -rf "$WORK"
  echo
  echo "cleaned up: namespaces $CLI and $SRV deleted, $WORK removed"
  exit "$rc"
}
trap cleanup EXIT INT TERM

say "tun2socks: $T2S ($T2S_VERSION)"

say "namespaces $CLI (client) and $SRV (server), joined by a veth pair"
for ns in "$CLI" "$SRV"; do
  ip netns add "$ns"
  mkdir -p "/etc/netns/$ns"
  echo "nameserver $WEB_IP" > "/etc/netns/$ns/resolv.conf"  # no lookups leave the demo
  ip -n "$ns" link set lo up
done
ip link add veth-demo netns "$CLI" type veth peer name veth-demo netns "$SRV"
ip -n "$CLI" addr add 10.200.0.1/24 dev veth-demo
ip -n "$SRV" addr add "$PROXY_IP/24" dev veth-demo
ip -n "$CLI" link set veth-demo up
ip -n "$SRV" link set veth-demo up
ip -n "$CLI" route add default via "$PROXY_IP"  # the server namespace plays the LAN gateway
ip -n "$SRV" addr add "$WEB_IP/32" dev lo

say "server: web server on $WEB_IP:8000, Dante SOCKS5 server on $PROXY_IP:1080"
mkdir -p "$WORK/www"
echo "Hello through tun2socks!" > "$WORK/www/index.html"
ip netns exec "$SRV" python3 -m http.server --bind "$WEB_IP" --directory "$WORK/www" 8000 \
  > "$WORK/web.log" 2>&1 &
cat > "$WORK/danted.conf" <<EOF
logoutput: $WORK/danted.log
internal: $PROXY_IP port = 1080
external: $PROXY_IP
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 10.200.0.0/24 to: 0/0 }
socks pass { from: 0/0 to: 10.201.0.0/24 command: connect }
socks block { from: 0/0 to: 0/0 log: connect error }
EOF
ip netns exec "$SRV" danted -f "$WORK/danted.conf" -p "$WORK/danted.pid" -N 1 \
  > "$WORK/danted.out" 2>&1 &
listening() { ip netns exec "$SRV" ss -Hltn | grep -c -e "$PROXY_IP:1080 " -e "$WEB_IP:8000 "; }
for _ in $(seq 100); do [[ $(listening) -ge 2 ]] && break; sleep 0.1; done
[[ $(listening) -ge 2 ]] || { echo "the servers did not start" >&2; exit 1; }

start_tun2socks() {  # CONFIG: run it in the client namespace, wait until it runs
  cat "$1"
  : > "$WORK/tun2socks.log"
  ip netns exec "$CLI" "$T2S" run -c "$1" >> "$WORK/tun2socks.log" 2>&1 &
  T2S_PID=$!
  for _ in $(seq 200); do
    grep -q "tun2socks running" "$WORK/tun2socks.log" && break
    kill -0 "$T2S_PID" 2>/dev/null || { cat "$WORK/tun2socks.log"; exit 1; }
    sleep 0.1
  done
  grep -q "tun2socks running" "$WORK/tun2socks.log" || { cat "$WORK/tun2socks.log"; exit 1; }
}

stop_tun2socks() {
  say "stopping tun2socks (SIGTERM): it undoes its routes and rules"
  kill -TERM "$T2S_PID"
  wait "$T2S_PID" && echo "tun2socks exited with status 0"
  T2S_PID=""
  ip -n "$CLI" rule
  echo "-- table 7280: $(ip -n "$CLI" route show table 7280 | wc -l) routes"
}

say "client: tun2socks with route.auto"
cat > "$WORK/tun2socks.yaml" <<EOF
tun: {name: $TUN, addresses: [198.18.0.1/15, "fd00:7f::1/64"]}
proxy: {url: "socks5://$PROXY_IP:1080"}
route: {auto: true, state_dir: $WORK/state}
log: {level: debug}
EOF
start_tun2socks "$WORK/tun2socks.yaml"

say "what route.auto set up in the client namespace"
ip -n "$CLI" rule
echo "-- table 7280:"
ip -n "$CLI" route show table 7280
echo "-- the web server goes into the TUN, the proxy keeps its path:"
ip -n "$CLI" route get "$WEB_IP"
ip -n "$CLI" route get "$PROXY_IP"

say "curl http://$WEB_IP:8000/ in the client namespace"
ip netns exec "$CLI" curl -sS --max-time 10 "http://$WEB_IP:8000/"

say "the connection in tun2socks' log"
grep -F -- "-> $WEB_IP:8000" "$WORK/tun2socks.log"
say "... and in the web server's log: the peer is the proxy ($PROXY_IP), not the client"
grep -F "GET / " "$WORK/web.log"

stop_tun2socks

say "round 2: the bypass mode, proxy.url direct://, with the SOCKS5 server stopped"
kill -TERM "$(cat "$WORK/danted.pid")"
for _ in $(seq 50); do [[ $(listening) -ge 2 ]] || break; sleep 0.1; done
[[ $(listening) -eq 1 ]] || { echo "danted did not stop" >&2; exit 1; }
echo "nothing listens on $PROXY_IP:1080 any more"
# route.mark: tun2socks' own sockets carry the mark, and a rule sends marked packets through
# the main table (the original path), so they never enter the TUN. route.auto needs it (or
# route.bind_interface) with direct://. The block rule turns the bypass into a packet filter.
cat > "$WORK/direct.yaml" <<EOF
tun: {name: $TUN, addresses: [198.18.0.1/15, "fd00:7f::1/64"]}
proxy: {url: "direct://"}
route: {auto: true, mark: 0x2a, state_dir: $WORK/state}
rules: [{dst: $WEB_IP/32, port: 22, action: block}]
log: {level: debug}
EOF
start_tun2socks "$WORK/direct.yaml"
ip -n "$CLI" rule

say "curl http://$WEB_IP:8000/ in the client namespace, again"
ip netns exec "$CLI" curl -sS --max-time 10 "http://$WEB_IP:8000/"
grep -F -- "-> $WEB_IP:8000" "$WORK/tun2socks.log"
say "... and in the web server's log: the peer is now the client itself (10.200.0.1)"
grep -F "10.200.0.1 - - " "$WORK/web.log"

say "curl http://$WEB_IP:22/: blocked by the rule, answered with a reset at once"
status=0
ip netns exec "$CLI" curl -sS --max-time 10 "http://$WEB_IP:22/" || status=$?
echo "curl exit status $status"
[[ $status -eq 7 ]] || { echo "the block rule did not reset it" >&2; exit 1; }
grep -F "blocked by rule" "$WORK/tun2socks.log"

stop_tun2socks
