#!/bin/busybox sh
# PID 1 of the lab's PV domU: count on the console, once a second, forever.
# The count lives in this guest's memory, so it goes on (does not restart at 1)
# across a save/restore or a migration: that is what the lab checks.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
n=0
while :; do
    n=$((n + 1))
    echo "count $n"
    sleep 1
done
