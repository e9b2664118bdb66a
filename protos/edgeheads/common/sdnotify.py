"""systemd's notify protocol (sd_notify(3)), spoken directly: no library, no systemd at all.

A service with ``Type=notify`` gets ``$NOTIFY_SOCKET``, the path of a datagram socket (a name
in the abstract namespace when it starts with ``@``); each message is one datagram of
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once the daemon serves, ``STOPPING=1`` when it
begins to stop, ``STATUS=...`` for ``systemctl status``, and ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` microseconds when the unit has ``WatchdogSec=`` (systemd restarts a daemon
whose pings stop). ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for.

Without ``$NOTIFY_SOCKET`` (a daemon started by hand, by ``edgeheads up``, in Docker) every call
here does nothing. Sending never raises: a lost notification must not take a daemon down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def socket_address(env: Mapping[str, str] | None = None) -> str | None:
    """The address of ``$NOTIFY_SOCKET`` for ``socket.sendto`` (abstract names with a leading
    NUL), or None when there is none or it is not a Unix socket."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    if path.startswith("/"):
        return path
    if path:
        # vsock:CID:PORT (systemd 253+, for VMs) is not spoken here
        log.debug("NOTIFY_SOCKET=%r is not a Unix socket path; not notifying", path)
    return None


def watchdog_seconds(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd expects pings within, in seconds, when it is meant for
    this process (``$WATCHDOG_PID`` unset or ours); None when there is no watchdog."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 1e6


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``"READY=1"``, ``"STATUS=serving"``, ...) as one datagram to
    ``$NOTIFY_SOCKET``; True when it was sent, False when there is no socket or sending failed."""
    address = socket_address(env)
    if address is None or not lines:
        return False
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET", ""), err)
        return False
    return True


class Notifier:
    """A daemon's side of the protocol: ``ready``, ``status``, ``stopping``, and a watchdog task
    that pings every half timeout while the event loop runs (a stuck loop stops the pings,
    which is the point)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self.enabled = socket_address(self.env) is not None
        self.watchdog = watchdog_seconds(self.env) if self.enabled else None
        self._task: asyncio.Task | None = None

    def send(self, *lines: str) -> bool:
        return self.enabled and notify(*lines, env=self.env)

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def stopping(self, status: str | None = "stopping") -> bool:
        self.stop_watchdog()
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def start_watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` every half timeout from the running loop (no-op without a watchdog)."""
        if self.watchdog is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._pings(self.watchdog / 2))

    def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _pings(self, every: float) -> None:
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(every)
