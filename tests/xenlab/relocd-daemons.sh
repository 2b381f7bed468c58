#!/bin/sh
# In the lab's dom0: start or stop two relocd daemons on two loopback
# addresses (a: 127.0.0.1, b: 127.0.0.2, both port 8002), each with its own
# state dir, control socket and log under /run/relocd-NAME.
#   sh relocd-daemons.sh start    # returns once both control sockets exist
#   sh relocd-daemons.sh stop
set -u
start() {  # NAME ADDRESS
    dir=/run/relocd-$1
    rm -rf "$dir"
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
case "${1:-}" in
start)
    start a 127.0.0.1
    start b 127.0.0.2
    for d in a b; do
        i=0
        until [ -S /run/relocd-$d/control.sock ]; do
            kill -0 "$(cat /run/relocd-$d/pid)" 2>/dev/null || { echo "daemon $d exited"; tail -20 /run/relocd-$d/daemon.log; exit 1; }
            [ $i -ge 180 ] && { echo "daemon $d: no control socket after 180 s"; exit 1; }
            sleep 1
            i=$((i + 1))
        done
    done
    ;;
stop)
    for d in a b; do
        [ -f /run/relocd-$d/pid ] && kill "$(cat /run/relocd-$d/pid)" 2>/dev/null
    done
    for d in a b; do
        i=0
        while [ -f /run/relocd-$d/pid ] && kill -0 "$(cat /run/relocd-$d/pid)" 2>/dev/null && [ $i -lt 30 ]; do
            sleep 1
            i=$((i + 1))
        done
    done
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
