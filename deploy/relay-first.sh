#!/bin/sh
# Relay frames before bulk traffic on one network interface of a board (or of the head node).
#
#   sudo deploy/relay-first.sh DEV RATE [RELAY_PORT]   e.g. wlan0 40mbit 50062
#   sudo deploy/relay-first.sh DEV off                 back to the interface's default qdisc
#   deploy/relay-first.sh DEV RATE [RELAY_PORT] --print   show the tc commands, run nothing
#
# What leaves DEV is shaped to RATE (a little under what the link really carries, so that the
# queue forms here, where it can be ordered, and not in the access point or switch). Inside it,
# packets to or from RELAY_PORT (the workers' worker.relay_port, the same on every board; the
# head node dials it) go first; everything else, above all a migration's pre-copy, borrows
# what they leave. Without it a pre-copy fills the link's one queue and every activation of
# every token waits behind it: decoding slowed 4.7x at the median during a pre-copy over
# 100 Mbit/s, against 1.25x with this (benchmarks/migration_netns.py, docs/boards.md).
# Set worker.precopy_link_fraction to 0 on such a board: the qdisc orders the queue, and pacing
# under the measured rate only slows the pre-copy. Each class may send 64 KiB at once, one
# GSO/TSO segment, so that a segment does not wait for the bucket to fill.
# Needs Linux tc with the htb qdisc (iproute2). Not persistent: run it at boot (a systemd
# ExecStartPre, or the network manager's up hook).
set -eu

usage() { echo "usage: $0 DEV RATE [RELAY_PORT] [--print] | $0 DEV off" >&2; exit 2; }
[ $# -ge 2 ] || usage
dev=$1 rate=$2 port=50062 print=""
shift 2
for arg in "$@"; do
    case $arg in
        --print) print=echo ;;
        *[!0-9]* | "") echo "$0: RELAY_PORT must be a port number, not '$arg'" >&2; exit 2 ;;
        *) port=$arg ;;
    esac
done
[ "$port" -ge 1 ] && [ "$port" -le 65535 ] || { echo "$0: RELAY_PORT $port is not 1..65535" >&2; exit 2; }

if [ "$rate" = off ]; then
    $print tc qdisc del dev "$dev" root 2>/dev/null || true
    exit 0
fi
case $rate in
    *[0-9]bit | *[0-9]kbit | *[0-9]mbit | *[0-9]gbit) ;;
    *) echo "$0: RATE is a number with bit, kbit, mbit or gbit (e.g. 40mbit), not '$rate'" >&2; exit 2 ;;
esac
[ -n "$print" ] || ip link show "$dev" >/dev/null 2>&1 || { echo "$0: no interface '$dev'" >&2; exit 1; }

[ -n "$print" ] || tc qdisc del dev "$dev" root 2>/dev/null || true  # start from the default
$print tc qdisc add dev "$dev" root handle 1: htb default 20
$print tc class add dev "$dev" parent 1: classid 1:1 htb rate "$rate" ceil "$rate" burst 64k cburst 64k
# relay frames: the whole rate, served first; the rest: 8 kbit/s guaranteed, borrowing what is left
$print tc class add dev "$dev" parent 1:1 classid 1:10 htb rate "$rate" ceil "$rate" burst 64k cburst 64k prio 0
$print tc class add dev "$dev" parent 1:1 classid 1:20 htb rate 8kbit ceil "$rate" burst 64k cburst 64k prio 1
for field in sport dport; do
    $print tc filter add dev "$dev" parent 1: protocol ip prio 1 u32 match ip "$field" "$port" 0xffff flowid 1:10
done
