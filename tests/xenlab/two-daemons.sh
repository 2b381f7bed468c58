#!/bin/sh
# In the lab's dom0: two relocd daemons on two loopback addresses, then
# `relocd migrate --live domu` from the first to the second.  Prints what
# happened; it asserts nothing (see docs/xen.md for what it shows today).
set -u
start() {  # NAME ADDRESS
    dir=/run/relocd-$1
    mkdir -p "$dir"
    cat >"$dir/config.sxp" <<CFG
(xend-relocation-server yes)
(xend-relocation-address '$2')
(xend-relocation-port 8002)
(relocd-control-socket $dir/control.sock)
(relocd-state-dir $dir/state)
(relocd-log-format json)
CFG
    python3 -m relocd serve --config "$dir/config.sxp" >"$dir/daemon.log" 2>&1 &
    echo $! >"$dir/pid"
}
start a 127.0.0.1
start b 127.0.0.2
for d in a b; do
    i=0
    until [ -S /run/relocd-$d/control.sock ] || [ $i -ge 120 ]; do
        kill -0 "$(cat /run/relocd-$d/pid)" 2>/dev/null || { echo "daemon $d exited"; break; }
        sleep 1
        i=$((i + 1))
    done
done
for d in a b; do echo "== relocd list ($d)"; python3 -m relocd list --control /run/relocd-$d/control.sock; done
echo "== migrate a -> b"
timeout 300 python3 -m relocd migrate --control /run/relocd-a/control.sock --live --json domu 127.0.0.2
echo "migrate exit status $?"
xl list
for d in a b; do echo "== daemon $d log (tail)"; tail -c 1500 /run/relocd-$d/daemon.log; done
for d in a b; do kill "$(cat /run/relocd-$d/pid)" 2>/dev/null; done
