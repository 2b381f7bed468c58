#!/bin/sh
# In the lab's dom0: start or stop relocd daemons, each with its own state
# dir, control socket and log under /run/relocd-NAME.
#   sh relocd-daemons.sh start                  # a: 127.0.0.1, b: 127.0.0.2 (two daemons, one dom0)
#   sh relocd-daemons.sh start-one NAME ADDRESS [HOSTS-ALLOW]
#                                               # one daemon (one per Xen host on a lab network)
#   sh relocd-daemons.sh stop                   # every daemon started here
# start and start-one return once the control sockets exist.
set -u
start() {  # NAME ADDRESS [HOSTS-ALLOW]
    # The state dir (journal) outlives a daemon: a restart recovers from it.
    # RELOCD_FAULT in the environment reaches the daemon (the fault tests).
    dir=/run/relocd-$1
    mkdir -p "$dir"
    rm -f "$dir/control.sock" "$dir/pid"
    cat >"$dir/config.sxp" <<CFG
(xend-relocation-server yes)
(xend-relocation-address '$2')
(xend-relocation-port 8002)
(xend-relocation-hosts-allow '${3:-}')
(relocd-control-socket $dir/control.sock)
(relocd-state-dir $dir/state)
(relocd-log-format json)
CFG
    # RELOCD_DAEMON_WRAP: a command the daemon runs under (hide-disks.sh), or none.
    ${RELOCD_DAEMON_WRAP:-} python3 -m relocd serve --config "$dir/config.sxp" >>"$dir/daemon.log" 2>&1 &
    echo $! >"$dir/pid"
}
wait_ready() {  # NAME...
    for d in "$@"; do
        i=0
        until [ -S /run/relocd-$d/control.sock ]; do
            kill -0 "$(cat /run/relocd-$d/pid)" 2>/dev/null || { echo "daemon $d exited"; tail -20 /run/relocd-$d/daemon.log; exit 1; }
            [ $i -ge 180 ] && { echo "daemon $d: no control socket after 180 s"; exit 1; }
            sleep 1
            i=$((i + 1))
        done
    done
}
case "${1:-}" in
start)
    start a 127.0.0.1
    start b 127.0.0.2
    wait_ready a b
    ;;
start-one)
    [ $# -ge 3 ] || { echo "usage: $0 start-one NAME ADDRESS [HOSTS-ALLOW]" >&2; exit 2; }
    start "$2" "$3" "${4:-}"
    wait_ready "$2"
    ;;
stop)
    for pid in /run/relocd-*/pid; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null
    done
    for pid in /run/relocd-*/pid; do
        i=0
        while [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && [ $i -lt 30 ]; do
            sleep 1
            i=$((i + 1))
        done
    done
    ;;
*)
    echo "usage: $0 start|start-one NAME ADDRESS [HOSTS-ALLOW]|stop" >&2
    exit 2
    ;;
esac
