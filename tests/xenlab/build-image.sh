#!/bin/bash
# Build the nested Xen lab's image from Debian's packages, once, into a cache
# outside the repository.  Needs root, debootstrap, busybox-static, cpio and
# e2fsprogs on the host, and a Debian mirror.
#
#   tests/xenlab/build-image.sh            # prints the image directory
#
# The directory's name carries a hash of this script and of dom0-boot.sh, so
# editing either builds a fresh image; a finished image has a BUILT stamp.
# Output:  xen (the hypervisor, gunzipped: a multiboot ELF), vmlinuz and
# initrd.img (dom0's kernel, also the domU's), domu-initrd.img (busybox, counts
# on its console), root.img (dom0's root filesystem, ext4).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${RELOCD_XENLAB_CACHE:-/var/cache/relocd-xenlab}
mirror=${RELOCD_XENLAB_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
key=$(cat "$0" "$here/dom0-boot.sh" "$here/domu-init.sh" | sha256sum | cut -c1-12)
out=$cache/image-$key

if [[ -e $out/BUILT ]]; then
    echo "$out"
    exit 0
fi
for tool in debootstrap mkfs.ext4 cpio; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is missing" >&2; exit 3; }
done
[[ -x /bin/busybox ]] || { echo "build-image: /bin/busybox (busybox-static) is missing" >&2; exit 3; }
[[ $(id -u) == 0 ]] || { echo "build-image: needs root" >&2; exit 3; }

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# Debian's own packages only: Xen 4.17 (hypervisor and tools), the stock
# kernel (a PV-capable dom0 and domU), Python for relocd.
packages=(
    xen-hypervisor-4.17-amd64 xen-utils-4.17 linux-image-amd64 initramfs-tools
    kmod udev iproute2 procps python3 python3-numpy
)
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# relocd's dependencies that Debian ships too old or not at all (pydantic 2,
# structlog, blake3, prometheus-client >= 0.20),
# as wheels for bookworm's Python 3.11 (PyPI, through pip).
python3 -m pip install --quiet --no-compile --target "$root/opt/relocd-deps" \
    --python-version 3.11 --only-binary=:all: --platform manylinux2014_x86_64 \
    "pydantic>=2.6" "structlog>=24.1" "uvloop>=0.19" "blake3>=0.4" "prometheus-client>=0.20"

install -m 0755 "$here/dom0-boot.sh" "$root/sbin/xenlab-boot"
echo xenlab >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 xenlab\n' >"$root/etc/hosts"
mkdir -p "$root/lab" "$root/var/log/xen/console" "$root/var/lib/xen"
# The image is booted with snapshot=on: nothing to fsck or keep.
echo "/dev/vda / ext4 rw 0 0" >"$root/etc/fstab"

kver=$(ls "$root/lib/modules" | sort -V | tail -1)
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
gunzip -c "$root"/boot/xen-4.17-amd64.gz >"$work/xen"

# The domU: busybox and a counter on its console.
initrd=$work/domu
mkdir -p "$initrd"/{bin,proc,sys,dev}
cp /bin/busybox "$initrd/bin/busybox"
install -m 0755 "$here/domu-init.sh" "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/domu-initrd.img"
cp "$work/domu-initrd.img" "$root/var/lib/xen/domu-initrd.img"
cp "$work/vmlinuz" "$root/var/lib/xen/domu-vmlinuz"

rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/boot/*
mkfs.ext4 -q -F -L xenlab-root -d "$root" "$work/root.img" 3G
rm -rf "$root"

mkdir -p "$out"
mv "$work"/{xen,vmlinuz,initrd.img,domu-initrd.img,root.img} "$out/"
echo "$kver" >"$out/BUILT"
echo "$out"
