#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests: 1 mon, 1 memstore OSD, no mgr,
# everything (config, keys, data, pids, logs, sockets) under DIR, bound to 127.0.0.1.
#
#   scripts/ceph-cluster.sh start DIR [PORT]   # prints "conf=DIR/ceph.conf" when usable
#   scripts/ceph-cluster.sh stop DIR           # SIGKILLs the daemons by pid, removes DIR
#
# Facts behind the settings: shared/notes/ceph-single-node.md (memstore page sets and
# a device size, or I/O hangs when full; paxos tuning, or every mon write costs ~1 s;
# client timeouts so a broken cluster fails a test instead of hanging it; readiness =
# a pool create + write succeeds, never HEALTH_OK, which needs a mgr).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR [PORT]" >&2; exit 2; }

stop() {
  local d=$1
  for p in "$d"/run/*.pid; do
    [ -e "$p" ] || continue
    kill -KILL "$(cat "$p")" 2>/dev/null || true
  done
  rm -rf "$d"
}

case "$cmd" in
stop) stop "$dir"; exit 0 ;;
start) ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac

for t in ceph-mon ceph-osd ceph ceph-authtool monmaptool; do
  command -v "$t" >/dev/null || { echo "missing $t (apt-get install ceph-mon ceph-osd ceph-common)" >&2; exit 3; }
done

# Port: given, else the first free block of 20 from one derived from the pid,
# so parallel test binaries and other clusters do not collide.
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -n "${3:-}" ]; then
  port=$3
else
  port=$((20000 + ($$ % 500) * 20))
  for _ in $(seq 1 50); do
    busy=0
    for p in $port $((port + 1)) $((port + 2)) $((port + 3)); do in_use "$p" && busy=1; done
    [ $busy = 0 ] && break
    port=$(( (port - 20000 + 20) % 10000 + 20000 ))
  done
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
mkdir -p "$dir/run" "$dir/log" "$dir/mon" "$dir/osd"
# On failure, say which step failed and show the daemons' last words.
trap 'rc=$?; echo "ceph-cluster.sh: failed (line $LINENO, rc $rc); logs:" >&2; tail -n 5 "$dir"/log/* >&2 2>/dev/null; exit $rc' ERR
fsid=$(cat /proc/sys/kernel/random/uuid)
conf="$dir/ceph.conf"
cat > "$conf" <<CONF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = $((port + 1))
ms bind port max = $((port + 19))
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/\$name.keyring
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
osd objectstore = memstore
# Memstore counts objects by their length, not the pages written: the suite's sparse
# 100 GiB ext4 copies and the SIGKILL campaign filled 4 GiB (OSD full, I/O timed out).
# RAM use is the pages actually written (page set), far below this.
memstore device bytes = 17179869184
memstore page set = true
memstore page size = 4096
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.05
# A throwaway mon: do not refuse to start on a fullish shared disk.
mon data avail crit = 1
mon data avail warn = 2
paxos min wait = 0.01
osd max object name len = 256
osd max object namespace len = 64
rados osd op timeout = 30
rados mon op timeout = 30
client mount timeout = 30
rbd cache = false

[client]
# Per process: librados binds its admin socket at connect and, when the path
# is taken, first asks the owner -- 10 s of waiting when that owner is stopped.
admin socket = $dir/run/\$name.\$pid.asok
log file = $dir/log/\$name.\$pid.log
CONF

ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
ceph-authtool --create-keyring "$dir/osd.0.keyring" --gen-key -n osd.0 \
  --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
# The mon's keyring ($name = mon.a) holds every key, so no `ceph auth add` round trips.
mv "$dir/mon.keyring" "$dir/mon.a.keyring"
ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
ceph-authtool "$dir/mon.a.keyring" --import-keyring "$dir/osd.0.keyring" >/dev/null

monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.a.keyring" 2>>"$dir/log/mkfs.log"
# Trap: --mkfs exits 0 and does nothing if the data dir is not empty.
[ -d "$dir/mon/mon.a/store.db" ] || { echo "ceph-mon --mkfs made no store in $dir/mon/mon.a" >&2; exit 1; }
ceph-mon -c "$conf" -i a 2>>"$dir/log/start.log"

osd_uuid=$(cat /proc/sys/kernel/random/uuid)
ceph -c "$conf" osd new "$osd_uuid" 0 >/dev/null 2>>"$dir/log/start.log"
mkdir -p "$dir/osd/osd.0"
ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1
ceph-osd -c "$conf" -i 0 2>>"$dir/log/start.log"
echo "conf=$conf"
