#!/usr/bin/env bash
# All-in-one OpenStack Swift peer on 127.0.0.1 only (Debian bookworm packages, swift 2.30).
#
#   bash bench/peers/swift/setup.sh            # install if needed, configure, start, wait healthy
#   bash bench/peers/swift/setup.sh --fresh    # stop, wipe data + rings under $SWIFT_PEER_BASE, start again
#   bash bench/peers/swift/stop.sh             # stop everything this script started (by PID)
#
# Layout (3 "nodes", each = account + container + object server on its own device):
#   node i in 1..3: object 127.0.0.1:161i0, container 161i1, account 161i2, device d<i>
#   rings: object/container/account, part_power 10, replicas 3, one zone per node
#   proxy 127.0.0.1:18080 with tempauth (test:tester / testing) + memcached 127.0.0.1:18211
# Only servers run: no replicator/auditor/updater daemons (they would add background load).
# Idempotent: re-running while everything is healthy changes nothing.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BASE="${SWIFT_PEER_BASE:-/srv/bench-peers-swift}"
ETC="$BASE/etc"; RUN="$BASE/run"; LOG="$BASE/log"; DATA="$BASE/node"
PROXY_PORT=18080; MEMCACHED_PORT=18211; PART_POWER=10
PROXY_WORKERS="${SWIFT_PROXY_WORKERS:-2}"; OBJ_WORKERS="${SWIFT_OBJECT_WORKERS:-1}"
PY=/usr/bin/python3
FRESH=0; [[ "${1:-}" == "--fresh" ]] && FRESH=1

log() { echo "[swift-setup] $*" >&2; }

# ---------------------------------------------------------------- packages
pkgs=()
command -v swift-object-server >/dev/null || pkgs+=(swift-object)
command -v swift-container-server >/dev/null || pkgs+=(swift-container)
command -v swift-account-server >/dev/null || pkgs+=(swift-account)
command -v swift-proxy-server >/dev/null || pkgs+=(swift-proxy)
command -v swift-ring-builder >/dev/null || pkgs+=(swift)
command -v memcached >/dev/null || pkgs+=(memcached)
if ((${#pkgs[@]})); then
  log "installing ${pkgs[*]} (Debian packages; service autostart is blocked by policy-rc.d if present)"
  apt-get update -qq >/dev/null 2>&1 || true
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
fi
[[ -f /etc/swift/swift.conf ]] || { log "missing /etc/swift/swift.conf (installed by the swift package)"; exit 1; }

# ---------------------------------------------------------------- already up?
if ((FRESH)); then
  bash "$HERE/stop.sh" || true
  rm -rf "$BASE"
fi
mkdir -p "$ETC" "$RUN" "$LOG" "$DATA"

healthy() {
  "$PY" - "$BASE" <<'EOF'
import http.client, json, sys
base = sys.argv[1]
try:
    peer = json.load(open(base + "/etc/peer.json"))
    for host, port in [tuple(x) for x in peer["all_servers"]]:
        c = http.client.HTTPConnection(host, port, timeout=2)
        c.request("GET", "/healthcheck")
        r = c.getresponse(); r.read()
        if r.status != 200:
            sys.exit(1)
    c = http.client.HTTPConnection("127.0.0.1", peer["proxy_port"], timeout=5)
    c.request("GET", "/auth/v1.0", headers={"X-Storage-User": peer["user"], "X-Storage-Pass": peer["key"]})
    r = c.getresponse(); r.read()
    tok, url = r.getheader("X-Auth-Token"), r.getheader("X-Storage-Url")
    if r.status != 200 or not tok:
        sys.exit(1)
    path = url.split("127.0.0.1:%d" % peer["proxy_port"], 1)[1] + "/" + peer["container"]
    c.request("PUT", path, headers={"X-Auth-Token": tok, "Content-Length": "0"})
    r = c.getresponse(); r.read()
    sys.exit(0 if r.status in (201, 202) else 1)
except Exception:
    sys.exit(1)
EOF
}

pid_alive() {  # pidfile -> 0 if the recorded process (pid + start time) is still the one we started
  local f=$1 pid st
  [[ -f $f ]] || return 1
  read -r pid st <"$f" || return 1
  [[ -n "${pid:-}" && -r /proc/$pid/stat ]] || return 1
  [[ "$(awk '{print $22}' /proc/$pid/stat 2>/dev/null)" == "$st" ]]
}

all_alive() {
  local f n=0
  for f in "$RUN"/*.pid; do [[ -e $f ]] || continue; pid_alive "$f" || return 1; n=$((n + 1)); done
  ((n == 11))
}

if all_alive && healthy; then
  log "already running and healthy (base $BASE)"
  cat "$ETC/peer.json"; exit 0
fi
bash "$HERE/stop.sh" >/dev/null 2>&1 || true   # clean up any partial previous start

# ---------------------------------------------------------------- xattr check
mkdir -p "$DATA/1"
if ! "$PY" - "$DATA/1" <<'EOF'
import os, sys
p = os.path.join(sys.argv[1], ".xattr-probe")
open(p, "w").close()
try:
    for i in range(4):  # swift writes pickled metadata in 254-byte user.swift.metadata<N> chunks
        os.setxattr(p, "user.swift.metadata%s" % (i or ""), b"x" * 254)
finally:
    os.unlink(p)
EOF
then
  log "no user xattrs under $DATA; trying a loopback ext4 image mounted on $BASE/node"
  img="$BASE/node.img"
  truncate -s "${SWIFT_PEER_IMG_SIZE:-16G}" "$img"
  mkfs.ext4 -q -F "$img"
  mount -o loop,user_xattr "$img" "$DATA" || { log "mount failed: Swift cannot run here (needs user xattrs)"; exit 1; }
fi
log "user xattrs OK under $DATA ($(df -T "$DATA" | awk 'NR==2{print $2}'))"

# ---------------------------------------------------------------- configs
for i in 1 2 3; do
  mkdir -p "$DATA/$i/d$i" "$ETC/object-server" "$ETC/container-server" "$ETC/account-server"
  common="[DEFAULT]
devices = $DATA/$i
mount_check = false
bind_ip = 127.0.0.1
user = root
swift_dir = $ETC
log_level = WARNING
log_udp_host = 127.0.0.1
log_udp_port = 514
"
  cat >"$ETC/object-server/$i.conf" <<EOF
$common
bind_port = 161${i}0
workers = $OBJ_WORKERS
log_name = object-$i

[pipeline:main]
pipeline = healthcheck object-server

[app:object-server]
use = egg:swift#object
log_requests = false

[filter:healthcheck]
use = egg:swift#healthcheck
EOF
  cat >"$ETC/container-server/$i.conf" <<EOF
$common
bind_port = 161${i}1
workers = 1
log_name = container-$i

[pipeline:main]
pipeline = healthcheck container-server

[app:container-server]
use = egg:swift#container
log_requests = false

[filter:healthcheck]
use = egg:swift#healthcheck
EOF
  cat >"$ETC/account-server/$i.conf" <<EOF
$common
bind_port = 161${i}2
workers = 1
log_name = account-$i

[pipeline:main]
pipeline = healthcheck account-server

[app:account-server]
use = egg:swift#account
log_requests = false

[filter:healthcheck]
use = egg:swift#healthcheck
EOF
done

cat >"$ETC/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $PROXY_PORT
workers = $PROXY_WORKERS
user = root
swift_dir = $ETC
log_name = proxy
log_level = WARNING
log_udp_host = 127.0.0.1
log_udp_port = 514

[pipeline:main]
# no proxy-logging (access log) to give Swift its best case; the rest is the minimal required set
pipeline = catch_errors gatekeeper healthcheck cache listing_formats tempauth copy dlo versioned_writes proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
user_admin_admin = admin .admin .reseller_admin
user_test_tester = testing .admin
token_life = 604800

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MEMCACHED_PORT

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:dlo]
use = egg:swift#dlo
[filter:versioned_writes]
use = egg:swift#versioned_writes
EOF

# ---------------------------------------------------------------- rings
for kind in object container account; do
  off=0; [[ $kind == container ]] && off=1; [[ $kind == account ]] && off=2
  if [[ ! -f "$ETC/$kind.ring.gz" ]]; then
    rm -f "$ETC/$kind.builder"
    swift-ring-builder "$ETC/$kind.builder" create $PART_POWER 3 1 >/dev/null
    for i in 1 2 3; do
      swift-ring-builder "$ETC/$kind.builder" add --region 1 --zone "$i" --ip 127.0.0.1 \
        --port "161${i}${off}" --device "d$i" --weight 100 >/dev/null
    done
    rc=0; swift-ring-builder "$ETC/$kind.builder" rebalance >/dev/null || rc=$?
    ((rc < 2)) || { log "ring rebalance failed for $kind (rc=$rc)"; exit 1; }
  fi
done

# peer description for bench.peers (endpoints, hash prefix/suffix for direct placement)
"$PY" - "$ETC" "$RUN" "$PROXY_PORT" "$PART_POWER" <<'EOF'
import configparser, json, sys
etc, run, proxy_port, part_power = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cp = configparser.ConfigParser()
cp.read("/etc/swift/swift.conf", encoding="latin1")
peer = {
    "proxy_port": proxy_port, "auth_path": "/auth/v1.0", "user": "test:tester", "key": "testing",
    "container": "bench", "account": "AUTH_test",
    "object_servers": [{"host": "127.0.0.1", "port": int("161%d0" % i), "device": "d%d" % i} for i in (1, 2, 3)],
    "all_servers": [["127.0.0.1", int("161%d%d" % (i, k))] for i in (1, 2, 3) for k in (0, 1, 2)]
                   + [["127.0.0.1", proxy_port]],
    "part_power": part_power,
    "hash_path_prefix": cp.get("swift-hash", "swift_hash_path_prefix", fallback=""),
    "hash_path_suffix": cp.get("swift-hash", "swift_hash_path_suffix", fallback=""),
    "pid_dir": run,
}
json.dump(peer, open(etc + "/peer.json", "w"), indent=1)
EOF

# ---------------------------------------------------------------- start
start() {  # name cmd... : own session/process group, pidfile holds "pid starttime"
  local name=$1; shift
  local pidf="$RUN/$name.pid"
  rm -f "$pidf"
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidf.tmp" "$@" >>"$LOG/$name.log" 2>&1 </dev/null &
  local k
  for k in $(seq 50); do [[ -s "$pidf.tmp" ]] && break; sleep 0.1; done
  local pid; pid=$(cat "$pidf.tmp"); rm -f "$pidf.tmp"
  echo "$pid $(awk '{print $22}' /proc/"$pid"/stat)" >"$pidf"
}

start memcached memcached -u memcache -l 127.0.0.1 -p $MEMCACHED_PORT -U 0 -m 64 -c 1024
for i in 1 2 3; do
  start "object-$i" swift-object-server "$ETC/object-server/$i.conf" -v
  start "container-$i" swift-container-server "$ETC/container-server/$i.conf" -v
  start "account-$i" swift-account-server "$ETC/account-server/$i.conf" -v
done
start proxy swift-proxy-server "$ETC/proxy-server.conf" -v

for k in $(seq 60); do
  if healthy; then
    log "healthy after ~${k}s: proxy http://127.0.0.1:$PROXY_PORT (tempauth test:tester/testing), 3 object servers, base $BASE"
    cat "$ETC/peer.json"; exit 0
  fi
  all_alive || { log "a server died during start; see $LOG/*.log"; tail -n 5 "$LOG"/*.log >&2; exit 1; }
  sleep 1
done
log "not healthy after 60s; see $LOG/*.log"; tail -n 5 "$LOG"/*.log >&2
exit 1
