#!/bin/sh
# Stage 2 (/sbin/init on the guest disk, PID 1): parse the repdisk.* kernel parameters and run
# the workload they name. The kernel keeps dotted parameters out of init's environment, so
# they are read from /proc/cmdline. PID 1 must never exit (the kernel would panic), so every
# path ends in poweroff or an endless sleep.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp

param() {  # param NAME DEFAULT: the value of repdisk.NAME on the kernel command line
    for word in $(cat /proc/cmdline); do
        case "$word" in "repdisk.$1="*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}

. /repdisk/workload.sh

WORKLOAD=$(param workload idle)
RECORDS=$(param records 0)
INTERVAL=$(param interval 0)
echo "REPDISK-BOOTED workload=$WORKLOAD records=$RECORDS"
case "$WORKLOAD" in
    idle) ;;
    records) run_records "$RECORDS" "$INTERVAL" ;;
    poweroff-after) run_records "$RECORDS" "$INTERVAL" && clean_poweroff ;;
    *) echo "REPDISK-FAIL: unknown workload '$WORKLOAD' (idle, records, poweroff-after)" ;;
esac
echo "REPDISK-IDLE"
while :; do sleep 3600; done
