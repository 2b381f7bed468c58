#!/bin/sh
# PID 1 of the lab's dom0 (baked into the image): mount the basics and the
# payload disk, then hand over to the payload's init, so that changing the
# lab's dom0 setup or relocd needs no image rebuild.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mount -t ext4 -o ro /dev/vdb /lab
if [ -x /lab/xenlab/dom0-init.sh ]; then
    /lab/xenlab/dom0-init.sh
fi
echo "xenlab: dom0 init ended; halting" >/dev/console
sync
echo o >/proc/sysrq-trigger
sleep 60
