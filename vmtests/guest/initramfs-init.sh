#!/bin/busybox sh
# Stage 1 (the initramfs's /init): load the virtio modules, mount /dev/vda (ext4) and
# switch_root to it, so that everything the workload does lives on the replicated disk.
# noatime: an idle guest must not write (replication tests count on a quiet disk).
# Any failure prints REPDISK-FAIL and powers the VM off, so a test fails fast instead of
# waiting for a marker that can never come.
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin

fail() {
    echo "REPDISK-FAIL: initramfs: $*"
    sync
    poweroff -f
}

echo "REPDISK-INITRAMFS"
case " $(cat /proc/cmdline) " in
    *" repdisk.probe=1 "*) echo "REPDISK-PROBE-OK"; poweroff -f ;;
esac

# load.order lists the modules that are not built into this kernel, dependencies first.
while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fail "insmod $mod failed"
done < /lib/modules/load.order

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "no /dev/vda after 10 s (is a virtio-blk disk attached?)"
    sleep 0.1
done
mount -t ext4 -o noatime /dev/vda /newroot || fail "cannot mount /dev/vda as ext4"
[ -x /newroot/sbin/init ] || fail "/dev/vda has no /sbin/init (not a repdisk guest disk?)"
mount --move /dev /newroot/dev || fail "cannot move /dev"
umount /sys
umount /proc
exec switch_root /newroot /sbin/init
