"""The testbed's network: one namespace per worker on a bridge, every directed link shaped.

Layout (needs root; Linux ``ip`` and ``tc``):
- a bridge in the root namespace holds the hub address ``SUBNET.1``: the controller and the
  head node listen there;
- worker i lives in namespace ``PREFIX-i`` with address ``SUBNET.(10 + i)``, joined to the
  bridge by a veth pair (``PREFIX-i-h`` in the root namespace, ``PREFIX-i-n`` inside).

Shaping with htb (``netem`` does not exist on this kernel, so links have rates, not delays):
every directed flow is shaped once, at its sender's egress. A worker's namespace-side veth
carries one htb class per destination (a u32 filter on the destination address) at that
pair's rate; the root-side veth of worker i shapes only what the hub sends to it (a filter
on the hub's source address), so bridged worker-to-worker traffic is not shaped twice.

Relay frames first (``relay_port``, the default): each shaped class has two leaves. Relay
traffic (to or from the workers' relay TCP port, every worker using the same one) goes to a leaf
at the link's rate with priority 0; everything else (migrations' pulls, weights, telemetry:
gRPC) to a leaf of 1% of it with priority 1, which borrows what the relay leaf leaves unused.
A relay frame then waits for at most the packet on the wire, not behind a pre-copy's queue
(benchmarks/migration_netns.py measures both ways). ``relay_port=None`` gives one FIFO class
per link instead, as a plain router does.

``plan_commands`` is pure (it returns the commands); ``apply`` runs them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PREFIX = "ehtb"
SUBNET = "10.79.0"
HUB = f"{SUBNET}.1"
UNSHAPED_BITS = 10_000_000_000  # the default class where nothing is to be shaped: 10 Gbit/s
RELAY_PORT = 50062  # every testbed worker's relay port (each has its own namespace, so one port serves)
BULK_SHARE = 0.01  # the rate a link guarantees what is not relay traffic; the rest it borrows


class NetworkError(RuntimeError):
    """A command the testbed's network needs failed; the message has its output."""


@dataclass(frozen=True)
class Endpoint:
    name: str  # a worker's name
    index: int  # its slot: namespace PREFIX-index, address SUBNET.(10 + index)

    @property
    def namespace(self) -> str:
        return f"{PREFIX}-{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{10 + self.index}"

    @property
    def host_veth(self) -> str:
        return f"{PREFIX}-{self.index}-h"

    @property
    def ns_veth(self) -> str:
        return f"{PREFIX}-{self.index}-n"


def bits(bytes_per_second: float) -> str:
    """A tc rate in bit/s."""
    return f"{max(8, int(round(bytes_per_second * 8)))}bit"


def _htb_root(dev: str, netns: str | None, default_rate_bits: str) -> list[list[str]]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    return [[*pre, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "1"],
            [*pre, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:1", "htb",
             "rate", default_rate_bits, "ceil", default_rate_bits]]


def _shaped_class(dev: str, netns: str | None, minor: int, rate_bytes: float, match: tuple[str, str],
                  relay_port: int | None = None) -> list[list[str]]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    direction, address = match
    rate = bits(rate_bytes)
    tc, to = [*pre, "tc"], ["match", "ip", direction, f"{address}/32"]
    out = [[*tc, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}", "htb", "rate", rate, "ceil", rate]]
    if relay_port is None:
        return out + [[*tc, "filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32", *to,
                       "flowid", f"1:{minor}"]]
    relay, bulk = f"1:{minor}1", f"1:{minor}2"  # tc reads minors as hex: distinct for minors 10..99
    out += [[*tc, "class", "add", "dev", dev, "parent", f"1:{minor}", "classid", relay, "htb", "rate", rate,
             "ceil", rate, "prio", "0"],
            [*tc, "class", "add", "dev", dev, "parent", f"1:{minor}", "classid", bulk, "htb",
             "rate", bits(rate_bytes * BULK_SHARE), "ceil", rate, "prio", "1"]]
    for port in ("sport", "dport"):  # filters of prio 1 are tried before those of prio 2
        out.append([*tc, "filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32", *to,
                    "match", "ip", port, str(relay_port), "0xffff", "flowid", relay])
    return out + [[*tc, "filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "2", "u32", *to,
                   "flowid", bulk]]


def plan_commands(endpoints: Sequence[Endpoint], rate: Mapping[tuple[str, str], float],
                  hub_name: str = "headnode", relay_port: int | None = RELAY_PORT) -> list[list[str]]:
    """Commands that build the bridge, every namespace and veth, and the shaping.
    ``rate[(source, destination)]``: bytes/s of each directed link, by worker name or
    ``hub_name`` (the controller and head node); a missing pair is not shaped. With
    ``relay_port``, relay traffic on each link goes first (above)."""
    bridge = f"{PREFIX}-br"
    out = [["ip", "link", "add", bridge, "type", "bridge"], ["ip", "addr", "add", f"{HUB}/24", "dev", bridge],
           ["ip", "link", "set", bridge, "up"]]
    for e in endpoints:
        out += [["ip", "netns", "add", e.namespace],
                ["ip", "link", "add", e.host_veth, "type", "veth", "peer", "name", e.ns_veth],
                ["ip", "link", "set", e.ns_veth, "netns", e.namespace],
                ["ip", "link", "set", e.host_veth, "master", bridge], ["ip", "link", "set", e.host_veth, "up"],
                ["ip", "netns", "exec", e.namespace, "ip", "addr", "add", f"{e.address}/24", "dev", e.ns_veth],
                ["ip", "netns", "exec", e.namespace, "ip", "link", "set", e.ns_veth, "up"],
                ["ip", "netns", "exec", e.namespace, "ip", "link", "set", "lo", "up"]]
    addresses = {e.name: e.address for e in endpoints} | {hub_name: HUB}
    for e in endpoints:
        out += _htb_root(e.ns_veth, e.namespace, bits(UNSHAPED_BITS / 8))
        for minor, (peer, address) in enumerate(sorted(addresses.items()), start=10):
            if peer != e.name and (e.name, peer) in rate:
                out += _shaped_class(e.ns_veth, e.namespace, minor, rate[e.name, peer], ("dst", address), relay_port)
        out += _htb_root(e.host_veth, None, bits(UNSHAPED_BITS / 8))
        if (hub_name, e.name) in rate:
            out += _shaped_class(e.host_veth, None, 10, rate[hub_name, e.name], ("src", HUB), relay_port)
    return out


def teardown_commands(count: int) -> list[list[str]]:
    """Commands that remove what ``plan_commands`` made for ``count`` slots (errors ignored)."""
    out = [["ip", "netns", "del", f"{PREFIX}-{i}"] for i in range(count)]
    out += [["ip", "link", "del", f"{PREFIX}-{i}-h"] for i in range(count)]
    return out + [["ip", "link", "del", f"{PREFIX}-br"]]


def run(commands: Sequence[Sequence[str]], check: bool = True) -> None:
    for command in commands:
        done = subprocess.run(list(command), capture_output=True, text=True)
        if check and done.returncode != 0:
            raise NetworkError(f"{' '.join(command)}: {done.stderr.strip() or done.stdout.strip()}")


def apply(endpoints: Sequence[Endpoint], rate: Mapping[tuple[str, str], float], slots: int | None = None,
          relay_port: int | None = RELAY_PORT) -> None:
    """Tear down whatever an earlier run left (``slots`` namespaces), then build anew."""
    run(teardown_commands(max(slots or 0, len(endpoints))), check=False)
    run(plan_commands(endpoints, rate, relay_port=relay_port))


def teardown(slots: int) -> None:
    run(teardown_commands(slots), check=False)
