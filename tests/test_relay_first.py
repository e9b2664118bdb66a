"""deploy/relay-first.sh: relay traffic and the rest land in their own htb classes on a real
interface (two network namespaces joined by a veth pair), the refusals of bad arguments, and
``off`` restoring the default qdisc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "relay-first.sh"
PORT = 50062


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.mark.parametrize("args,message", [
    (["eth0"], "usage"),
    (["eth0", "40"], "RATE is a number with bit"),
    (["eth0", "40mbit", "relay"], "RELAY_PORT must be a port number"),
    (["eth0", "40mbit", "70000"], "not 1..65535"),
])
def test_bad_arguments_are_refused_with_a_reason(args, message):
    done = run("sh", str(SCRIPT), *args, check=False)
    assert done.returncode == 2 and message in done.stderr


def test_print_shows_the_commands_without_running_them():
    done = run("sh", str(SCRIPT), "nosuchdev0", "40mbit", "50070", "--print")
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and lines[0] == "tc qdisc add dev nosuchdev0 root handle 1: htb default 20"
    assert sum("match ip sport 50070 0xffff flowid 1:10" in x or "match ip dport 50070 0xffff flowid 1:10" in x
               for x in lines) == 2


def class_bytes(namespace: str, dev: str) -> dict[str, int]:
    out = run("ip", "netns", "exec", namespace, "tc", "-s", "class", "show", "dev", dev).stdout
    found, current = {}, None
    for line in out.splitlines():
        if line.startswith("class htb"):
            current = line.split()[2]
        elif line.strip().startswith("Sent") and current:
            found[current] = int(line.split()[1])
    return found


@pytest.mark.system
def test_relay_port_traffic_and_the_rest_take_their_own_classes(require_capability):
    require_capability("root", os.geteuid() == 0)
    require_capability("ip and tc", bool(shutil.which("ip") and shutil.which("tc")))
    tag = f"ehrf{os.getpid() % 100000}"
    a, b = f"{tag}a", f"{tag}b"
    try:
        for ns in (a, b):
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", f"{tag}-0", "netns", a, "type", "veth", "peer", "name", f"{tag}-1", "netns", b)
        for ns, dev, address in ((a, f"{tag}-0", "10.81.0.1"), (b, f"{tag}-1", "10.81.0.2")):
            run("ip", "netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", dev)
            run("ip", "netns", "exec", ns, "ip", "link", "set", dev, "up")
        run("ip", "netns", "exec", a, "sh", str(SCRIPT), f"{tag}-0", "50mbit", str(PORT))
        before = class_bytes(a, f"{tag}-0")
        assert {"1:1", "1:10", "1:20"} <= set(before)
        # every class may send one 64 KiB GSO segment at once (htb's default here is 1600 bytes)
        shown = run("ip", "netns", "exec", a, "tc", "class", "show", "dev", f"{tag}-0").stdout.splitlines()
        assert len(shown) == 3 and all("burst 64Kb cburst 64Kb" in line for line in shown), shown
        sender = ("import socket, sys, time\n"
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  "s.sendto(b'arp', ('10.81.0.2', 9)); time.sleep(0.3)\n"  # the neighbour known first

                  "for port, n in ((int(sys.argv[1]), 20), (int(sys.argv[1]) - 1, 50)):\n"
                  "    for _ in range(n): s.sendto(bytes(1000), ('10.81.0.2', port))\n")
        run("ip", "netns", "exec", a, sys.executable, "-c", sender, str(PORT))
        deadline = time.monotonic() + 10
        while True:  # a class counts a packet when it leaves the queue: at 50 Mbit/s, ms after the send
            after = class_bytes(a, f"{tag}-0")
            relay, rest = after["1:10"] - before["1:10"], after["1:20"] - before["1:20"]
            if (relay >= 20 * 1000 and rest >= 50 * 1000) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert 20 * 1000 <= relay < 50 * 1000  # the 20 datagrams to the relay port, not the others
        assert rest >= 50 * 1000
        run("ip", "netns", "exec", a, "sh", str(SCRIPT), f"{tag}-0", "off")
        shown = run("ip", "netns", "exec", a, "tc", "qdisc", "show", "dev", f"{tag}-0").stdout
        assert "htb" not in shown
        run("ip", "netns", "exec", a, "sh", str(SCRIPT), f"{tag}-0", "50mbit")  # again: from the default
        assert "htb" in run("ip", "netns", "exec", a, "tc", "qdisc", "show", "dev", f"{tag}-0").stdout
        missing = run("ip", "netns", "exec", a, "sh", str(SCRIPT), "nosuchdev0", "50mbit", check=False)
        assert missing.returncode == 1 and "no interface" in missing.stderr
    finally:
        for ns in (a, b):
            run("ip", "netns", "del", ns, check=False)
