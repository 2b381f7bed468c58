#!/bin/sh
# The lab's dom0 setup (run from the payload disk by /sbin/xenlab-boot):
# Xen's daemons, then a command shell on the console for the host to drive.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export PYTHONPATH=/lab:/opt/relocd-deps
export HOME=/root
echo 1 >/proc/sys/kernel/printk
LAB_HOSTNAME=xenlab
LAB_ADDRESS=
# Written by lab.py for labs on a lab network (two Xen hosts): name, address.
[ -f /lab/host.env ] && . /lab/host.env
hostname "$LAB_HOSTNAME"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback; do
    modprobe "$m" 2>/dev/null
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/lock /run/xenstored /var/lib/xenstored /var/log/xen/console /run/xen
oxenstored --pid-file /run/xenstored.pid
i=0
until xenstore-read / >/dev/null 2>&1 || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
xen-init-dom0
xenconsoled --log=guest --log-dir=/var/log/xen/console --pid-file=/run/xenconsoled.pid
ip link set lo up
if [ -n "$LAB_ADDRESS" ]; then
    # The lab's one NIC (the initramfs's udev names it, ens3 under QEMU's PC).
    modprobe virtio_net 2>/dev/null
    nic=
    i=0
    while [ -z "$nic" ] && [ $i -lt 50 ]; do
        for n in /sys/class/net/*; do [ -e "$n/device" ] && nic=${n##*/} && break; done
        [ -n "$nic" ] || sleep 0.1
        i=$((i + 1))
    done
    if [ -n "$nic" ]; then
        ip link set "$nic" up
        ip addr add "$LAB_ADDRESS" dev "$nic"
    else
        echo "xenlab: no NIC for $LAB_ADDRESS" >/dev/console
    fi
fi
stty -F /dev/hvc0 -echo -onlcr 2>/dev/null
echo "XENLAB-READY $(uname -r)"
while :; do
    PS1= PS2= sh +m </dev/hvc0 >/dev/hvc0 2>&1
done
