# The records workload, sourced by /sbin/init (busybox ash).
#
# Record <seq> is the line "REC <seq> <payload> <sha256 of 'REC <seq> <payload>'>", where the
# payload is derived from <seq> alone (checker.py computes the same), so a record is valid
# exactly when it equals the line this script would write for its sequence number.
# Each record is appended to $RECORDS_FILE and fsync'd, then written to its 512-byte slot in
# the raw region and fsync'd, and only then "REPDISK-RECORD <seq>" is printed: a record the
# console announced is durable on both, and the raw region is never ahead of the file.
# The raw region is the whole of /dev/vdb when a second disk is attached, else the tail of
# /dev/vda past the filesystem (RAW_OFFSET and RAW_SLOTS in /etc/repdisk.conf).

RECORDS_FILE=/data/records.log
. /etc/repdisk.conf
if [ -b /dev/vdb ]; then
    RAW_DEV=/dev/vdb
    RAW_OFFSET=0
    RAW_SLOTS=$(cat /sys/block/vdb/size)  # 512-byte sectors, one record each
else
    RAW_DEV=/dev/vda
fi
RAW_FIRST=$((RAW_OFFSET / 512))

fail() {
    echo "REPDISK-FAIL: $*"
    return 1
}

record_line() {  # record_line SEQ: the canonical line of record SEQ
    s=$1
    payload=$(printf '%08x%08x%08x%08x' $(( (s * 2654435761) & 0xffffffff )) \
        $(( (s * 2246822519) & 0xffffffff )) $(( (s * 3266489917) & 0xffffffff )) \
        $(( (s * 668265263) & 0xffffffff )))
    sum=$(printf 'REC %s %s' "$s" "$payload" | sha256sum)
    echo "REC $s $payload ${sum%% *}"
}

raw_slot() {  # raw_slot SEQ: the first line stored in record SEQ's raw slot
    dd if="$RAW_DEV" bs=512 skip=$((RAW_FIRST + $1 - 1)) count=1 2>/dev/null | head -n 1
}

write_raw() {  # write_raw SEQ LINE
    [ "$1" -le "$RAW_SLOTS" ] ||
        { fail "raw region on $RAW_DEV is full ($RAW_SLOTS records)"; return 1; }
    printf '%s\n' "$2" | dd of="$RAW_DEV" bs=512 seek=$((RAW_FIRST + $1 - 1)) count=1 \
        conv=sync,notrunc,fsync 2>/dev/null || fail "cannot write record $1 to $RAW_DEV"
}

last_valid_record() {  # the highest N such that line N of the file is record N
    [ -f "$RECORDS_FILE" ] || { echo 0; return; }
    n=$(wc -l < "$RECORDS_FILE")
    while [ "$n" -gt 0 ] && [ "$(sed -n "${n}p" "$RECORDS_FILE")" != "$(record_line "$n")" ]; do
        n=$((n - 1))
    done
    echo "$n"
}

recover() {  # drop a torn tail of the file, complete the raw slot of its last record
    n=$(last_valid_record)
    if [ -f "$RECORDS_FILE" ] &&
        [ "$(head -n "$n" "$RECORDS_FILE" | wc -c)" != "$(wc -c < "$RECORDS_FILE")" ]; then
        echo "REPDISK-TRUNCATE keeping $n records"
        head -n "$n" "$RECORDS_FILE" > "$RECORDS_FILE.tmp" && sync "$RECORDS_FILE.tmp" &&
            mv "$RECORDS_FILE.tmp" "$RECORDS_FILE" && sync || return 1
    fi
    if [ "$n" -gt 0 ]; then
        line=$(record_line "$n")
        [ "$(raw_slot "$n")" = "$line" ] || write_raw "$n" "$line" || return 1
    fi
    NEXT=$((n + 1))
}

run_records() {  # run_records COUNT INTERVAL: append COUNT records (0: forever)
    mkdir -p "${RECORDS_FILE%/*}"
    recover || { fail "cannot recover the records"; return 1; }
    echo "REPDISK-RESUME next=$NEXT"
    last=$((NEXT + $1 - 1))
    seq=$NEXT
    while [ "$1" -eq 0 ] || [ "$seq" -le "$last" ]; do
        line=$(record_line "$seq")
        printf '%s\n' "$line" | dd of="$RECORDS_FILE" oflag=append conv=notrunc,fsync 2>/dev/null ||
            { fail "cannot append record $seq to $RECORDS_FILE"; return 1; }
        write_raw "$seq" "$line" || return 1
        echo "REPDISK-RECORD $seq"
        [ "$2" = 0 ] || sleep "$2"
        seq=$((seq + 1))
    done
    echo "REPDISK-DONE last=$last"
}

clean_poweroff() {  # leave the filesystem clean (no journal to replay), then power off
    sync
    mount -o remount,ro / || echo "REPDISK-WARN: cannot remount / read-only"
    echo "REPDISK-POWEROFF"
    poweroff -f
}
