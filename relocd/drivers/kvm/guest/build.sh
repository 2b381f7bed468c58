#!/bin/sh
# Build the guest as a flat binary loaded at CODE_ADDR (0x10000, layout.py).
# Reproducible: a flat binary has no timestamps, so the same source and
# binutils give the same bytes (tests/unit/test_kvm_abi.py checks guest.bin).
# usage: build.sh [OUTPUT]   (default: guest.bin next to this script)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/guest.bin}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/guest.o" "$here/guest.s"
ld -m elf_x86_64 -N -e _start -Ttext=0x10000 --oformat binary -o "$tmp/guest.bin" "$tmp/guest.o"
mv "$tmp/guest.bin" "$out"
