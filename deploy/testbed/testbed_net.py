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


def _shaped_class(dev: str, netns: str | None, minor: int, rate: str, match: tuple[str, str]) -> list[list[str]]:
    pre = ["ip", "netns", "exec", netns] if netns else []
    direction, address = match
    return [[*pre, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{minor}", "htb",
             "rate", rate, "ceil", rate],
            [*pre, "tc", "filter", "add", "dev", dev, "protocol", "ip", "parent", "1:", "prio", "1", "u32",
             "match", "ip", direction, f"{address}/32", "flowid", f"1:{minor}"]]


def plan_commands(endpoints: Sequence[Endpoint], rate: Mapping[tuple[str, str], float],
                  hub_name: str = "headnode") -> list[list[str]]:
    """Commands that build the bridge, every namespace and veth, and the shaping.
    ``rate[(source, destination)]``: bytes/s of each directed link, by worker name or
    ``hub_name`` (the controller and head node); a missing pair is not shaped."""
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
                out += _shaped_class(e.ns_veth, e.namespace, minor, bits(rate[e.name, peer]), ("dst", address))
        out += _htb_root(e.host_veth, None, bits(UNSHAPED_BITS / 8))
        if (hub_name, e.name) in rate:
            out += _shaped_class(e.host_veth, None, 10, bits(rate[hub_name, e.name]), ("src", HUB))
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


def apply(endpoints: Sequence[Endpoint], rate: Mapping[tuple[str, str], float], slots: int | None = None) -> None:
    """Tear down whatever an earlier run left (``slots`` namespaces), then build anew."""
    run(teardown_commands(max(slots or 0, len(endpoints))), check=False)
    run(plan_commands(endpoints, rate))


def teardown(slots: int) -> None:
    run(teardown_commands(slots), check=False)
