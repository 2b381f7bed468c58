#!/bin/sh
# In the lab's dom0: run COMMAND in a mount namespace of its own in which DIR
# is an empty tmpfs (a host that cannot reach the disks under DIR).
#   sh hide-disks.sh DIR COMMAND...     (relocd-daemons.sh: RELOCD_DAEMON_WRAP)
# Every step execs, so COMMAND keeps this script's PID.
dir=$1
shift
exec unshare --mount --propagation private sh -c 'mount -t tmpfs tmpfs "$0" && exec "$@"' "$dir" "$@"
