"""An emulated edge testbed: one worker per emulated board, each in its own network namespace
with shaped links and a CPU quota; a controller and a head node on the hub; scripted events
(a CPU hog on a board, a memory limit dropping, a board joining or leaving) during one
generation. Needs root (namespaces, tc, cgroups).

    sudo python deploy/testbed/testbed.py PROFILE.yaml [--policy resource-aware] [--tokens 512]
                                          [--prompt TEXT] [--dtype fp32] [--out out]

Per run it writes OUT/testbed-NAME-POLICY.json: every token's id and arrival time, the events
with the token they fired at, the controller's decisions (epoch, reason, blocks moved, its
predicted per-token latency) and, per placement that ran, the predicted against the measured
median token time (the fidelity record); and a per-token timeline plot (PNG) with the events
marked. Profiles: deploy/testbed/testbed_profile.py, examples in deploy/testbed/profiles/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grpc  # noqa: E402

import testbed_cgroup as cgroup  # noqa: E402
import testbed_net as net  # noqa: E402
from testbed_profile import Event, Profile, load_profile  # noqa: E402

from edgeheads.headnode.embedded import LocalCluster  # noqa: E402
from edgeheads.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

SETTLE_TOKENS = 2  # tokens after a placement change left out of its measured median (the switch itself)
TELEMETRY_WAIT_SECONDS = 2.5  # two telemetry periods: the timings of a warm-up reach the controller
PREDICTION_POLL_SECONDS = 0.25  # how often a run records the controller's current prediction
MIN_SEGMENT_TOKENS = 8  # a placement under one set of conditions measured over fewer is left out
# A worker's report tells the controller how its blocks ran over the telemetry period before it
# (1 s by default), so a prediction made at time t speaks for conditions up to this long before t
REPORT_LAG_SECONDS = 1.0
RELAY_FIRST_PRECOPY_SLOWDOWN = 1.25  # median token time during a pre-copy with relay frames first (docs/placement.md)
# A board left a tenth of a core by a hog (edge-hog) can go more than the default 5 s between
# telemetry reports: its decode steps take over a second each and run on the loop that sends
# them. The controller would then drop a worker that is only slow, and re-plan even the static
# plan. A worker that really leaves closes its telemetry stream, which is noticed at once.
HEARTBEAT_TIMEOUT_SECONDS = 30.0


class Testbed(LocalCluster):
    """A LocalCluster whose workers are the profile's devices, each in its namespace and CPU group."""

    def __init__(self, profile: Profile, policy: str, dtype: str | None = None, model: str | None = None,
                 replan_every_tokens: int | None = None, progress: bool = False) -> None:
        interval = profile.scenario.interval_tokens if replan_every_tokens is None else replan_every_tokens
        env = {"EDGEHEADS_CONTROLLER__POLICY": policy, "EDGEHEADS_CONTROLLER__REPLAN_EVERY_TOKENS": str(interval),
               "EDGEHEADS_WORKER__METRICS_LISTEN": "0.0.0.0:0",  # a worker binds inside its namespace
               "EDGEHEADS_CONTROLLER__HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT_SECONDS)}
        if profile.testbed.relay_priority:  # what benchmarks/migration_netns.py measures with relay frames first
            env["EDGEHEADS_CONTROLLER__PRECOPY_SLOWDOWN"] = str(RELAY_FIRST_PRECOPY_SLOWDOWN)
        super().__init__(model, workers=len(profile.devices), host=net.HUB, progress=progress, extra_env=env,
                         dtype=dtype)
        self.profile = profile
        self.policy = policy
        self.endpoints = {name: net.Endpoint(name, i) for i, name in enumerate(profile.all_devices)}
        self.groups: dict[str, cgroup.CpuGroup] = {}
        self.hogs: dict[str, cgroup.CpuHog] = {}
        self.worker_threads = 1

    # ------------------------------------------------------------------ set-up and teardown
    def start(self) -> str:
        try:
            net.apply(list(self.endpoints.values()), self.profile.rates,
                      relay_port=net.RELAY_PORT if self.profile.testbed.relay_priority else None)
            for name in self.endpoints:
                self.groups[name] = cgroup.CpuGroup(f"{net.PREFIX}-{name}", self.profile.cores[name])
            self._spawn("controller", ["-vv", "controller", "--listen", f"{self.host}:0"])  # its plans and why
            self._wait_ready(["controller"])
            for name in self.profile.devices:  # one at a time: a board measures itself alone, as on its own
                self._spawn(name, self._device_args(name))
                self._wait_ready([name])
            args = ["-v", "headnode", "--listen", f"{self.host}:0", "--controller", self.addresses["controller"],
                    "--min-workers", str(len(self.profile.devices)), "--quiet"]
            if self.model:
                args += ["--model", self.model]
            if self.dtype:
                args += ["--dtype", self.dtype]
            self._spawn("headnode", args)
            self._wait_ready(["headnode"])
        except BaseException:
            self.stop()
            raise
        return self.addresses["headnode"]

    def _device_args(self, name: str) -> list[str]:
        return ["worker", "--listen", f"{self.endpoints[name].address}:0", "--controller", self.addresses["controller"],
                "--name", name, "--threads", "1", "--memory-limit", str(self.profile.memory[name]),
                "--relay-port", str(net.RELAY_PORT)]

    def _command(self, name: str, args: list[str]) -> list[str]:
        command = super()._command(name, args)
        if name not in self.endpoints:
            return command
        # nsenter enters the board's network namespace only: `ip netns exec` also remounts /sys,
        # which hides /sys/fs/cgroup, and the worker reads its CPU quota there (worker/cpu_share.py)
        if shutil.which("nsenter"):
            return ["nsenter", f"--net=/run/netns/{self.endpoints[name].namespace}", *command]
        return ["ip", "netns", "exec", self.endpoints[name].namespace, *command]

    def _spawn(self, name: str, args: list[str], show_stderr: bool = False, append: bool = False,
               tie_to_parent: bool = True) -> None:
        super()._spawn(name, args, show_stderr, append, tie_to_parent)
        if name in self.groups:
            self.groups[name].add(self.procs[name].pid)  # nsenter (or `ip netns exec`) execs the worker in this process

    def stop(self, timeout_seconds: float = 10) -> None:
        for hog in self.hogs.values():
            hog.stop()
        self.hogs.clear()
        try:
            super().stop(timeout_seconds)
        finally:
            for group in self.groups.values():
                group.remove()
            net.teardown(len(self.endpoints))

    # ------------------------------------------------------------------ events
    def fire(self, event: Event) -> None:
        device = event.device
        if event.kind == "cpu_hog":
            self.hogs[device] = cgroup.CpuHog(self.groups[device], event.processes)
        elif event.kind == "cpu_hog_stop":
            hog = self.hogs.pop(device, None)
            if hog is not None:
                hog.stop()
        elif event.kind == "memory_limit":
            with grpc.insecure_channel(self.addresses[device]) as channel:
                worker_pb2_grpc.WorkerStub(channel).SetMemoryLimit(
                    worker_pb2.SetMemoryLimitRequest(memory_limit_bytes=int(event.memory_bytes or 0)), timeout=10)
        elif event.kind == "join":
            self._spawn(device, self._device_args(device))
            self._wait_ready([device])
        elif event.kind == "leave":
            proc = self.procs.get(device)
            if proc is not None and proc.poll() is None:
                proc.terminate()

    def controller_status(self) -> controller_pb2.ControllerStatusReply:
        with grpc.insecure_channel(self.addresses["controller"]) as channel:
            return controller_pb2_grpc.ControllerStub(channel).Status(controller_pb2.ControllerStatusRequest(),
                                                                     timeout=10)

    def decisions(self) -> list[dict]:
        return [{"epoch": d.epoch, "unix_time": d.unix_time, "reason": d.reason, "policy": d.policy,
                 "blocks_moved": d.blocks_moved, "predicted_token_seconds": d.predicted_token_seconds or None,
                 "calibrated": d.calibrated}
                for d in self.controller_status().decisions]

    def calibration(self) -> dict:
        """What the controller's cost model has learned, and its prediction for the placement in use."""
        reply = self.controller_status()
        c = reply.calibration
        return {"epoch": reply.epoch, "hop_seconds": c.hop_seconds, "head_seconds": c.head_seconds,
                "kind_factors": dict(c.kind_factors), "windows": c.observations,
                "predicted_token_seconds": reply.current_predicted_token_seconds or None}

    def warm_up(self, prompt: str, tokens: int) -> dict:
        """A short generation before the measured one, as a cluster's first request would be: the
        workers time their blocks and the controller fits its message cost on it. Returns the
        calibration after it (with the controller's prediction for the placement in use)."""
        from edgeheads.headnode.client import Client

        with Client(self.address) as client:
            for event in client._events(prompt, tokens, 0.0, 0, 1.0, None, False, ignore_eos=True):
                if event.done:
                    break
        time.sleep(TELEMETRY_WAIT_SECONDS)  # the workers' next reports carry the timings
        return self.calibration()


# ---------------------------------------------------------------------- one generation
@dataclass
class Run:
    token_ids: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # unix time of each token
    epochs: list[int] = field(default_factory=list)  # the head node's epoch when each token arrived
    fired: list[dict] = field(default_factory=list)  # events: kind, device, token, unix time, seconds taken
    decisions: list[dict] = field(default_factory=list)
    status: dict = field(default_factory=dict)
    warmup: dict | None = None  # Testbed.warm_up's calibration, when the run had one
    predictions: list[tuple[float, int, float]] = field(default_factory=list)  # (unix time, epoch, s/token)
    calibration: dict = field(default_factory=dict)  # the controller's at the end


def generate(bed: Testbed, prompt: str, tokens: int, chat: bool | None = False, warmup_tokens: int = 0) -> Run:
    """One greedy generation, firing the profile's events at their tokens (each in a thread of
    its own, so the stream is never held up) and noting the epoch every token ran under; after a
    warm-up generation of ``warmup_tokens`` when that is not 0."""
    from edgeheads.headnode.client import Client

    run = Run()
    if warmup_tokens:
        run.warmup = bed.warm_up(prompt, warmup_tokens)
    epoch = [0]
    done = threading.Event()
    pending = list(bed.profile.events)
    threads: list[threading.Thread] = []

    def watch_epoch(client: Client) -> None:
        asked = 0.0
        while not done.is_set():
            try:
                epoch[0] = client.status()["epoch"]
                if time.time() - asked >= PREDICTION_POLL_SECONDS:  # the controller's prediction, as it stands
                    asked = time.time()
                    reply = bed.controller_status()
                    # the prediction is for the epoch the head node's steps ran under (running_epoch),
                    # which is older than reply.epoch while a migration is pending
                    if reply.current_predicted_token_seconds > 0:
                        run.predictions.append((asked, reply.running_epoch, reply.current_predicted_token_seconds))
            except Exception:  # noqa: BLE001 - a status call racing a stop: the next one tells
                pass
            time.sleep(0.05)

    def fire(event: Event, token: int) -> None:
        start = time.time()
        error = None
        try:
            bed.fire(event)
        except Exception as err:  # noqa: BLE001 - recorded and reported with the run
            error = str(err)
        run.fired.append({"kind": event.kind, "device": event.device, "token": token, "unix_time": start,
                          "seconds": time.time() - start, "error": error})

    with Client(bed.address) as client, Client(bed.address) as watcher:
        epoch[0] = watcher.status()["epoch"]
        poller = threading.Thread(target=watch_epoch, args=(watcher,), daemon=True)
        poller.start()
        try:
            while pending and pending[0].at_token == 0:
                fire(pending.pop(0), 0)
            # every run is ``tokens`` long, whatever this machine's kernels make of the end
            for event in client._events(prompt, tokens, 0.0, 0, 1.0, None, chat, ignore_eos=True):
                if event.done:
                    break
                run.token_ids.append(event.token_id)
                run.arrivals.append(time.time())
                run.epochs.append(epoch[0])
                while pending and pending[0].at_token <= len(run.token_ids):
                    thread = threading.Thread(target=fire, args=(pending.pop(0), len(run.token_ids)), daemon=True)
                    thread.start()
                    threads.append(thread)
            # the reports on the last tokens reach the controller after them (fidelity)
            time.sleep(REPORT_LAG_SECONDS + PREDICTION_POLL_SECONDS)
        finally:
            done.set()
            for thread in threads:
                thread.join(timeout=120)
        run.status = client.status()
    run.decisions = bed.decisions()
    run.calibration = bed.calibration()
    return run


def segments(run: Run) -> list[tuple[int, int, int]]:
    """(epoch, first token, end token) of each stretch that ran one placement under one set of
    conditions: cut at every placement switch and every event."""
    cuts = sorted({0, len(run.arrivals), *(e["token"] for e in run.fired if 0 < e["token"] < len(run.arrivals)),
                   *(i for i in range(1, len(run.epochs)) if run.epochs[i] != run.epochs[i - 1])})
    return [(run.epochs[a], a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def fidelity(run: Run) -> list[dict]:
    """Per stretch of one placement under one set of conditions (``segments``) long enough to
    measure: the median gap between its tokens (the first SETTLE_TOKENS after a cut left out)
    beside the controller's predicted token time for that placement.

    ``predicted_token_seconds`` is the controller's prediction for the stretch's second half:
    the median of those polled from its middle, but not before REPORT_LAG_SECONDS into it (a
    report speaks for the telemetry period before it, so earlier ones describe the stretch
    before), to its end (later ones mix in the next stretch's conditions; the last stretch of
    the run takes those up to REPORT_LAG_SECONDS after it). ``measured_token_seconds`` is
    the median gap over the tokens those predictions speak for, from REPORT_LAG_SECONDS
    before the first of them (``measured_tokens`` of them): under a hog a board's speed
    drifts, by 2.5x over one 400-token stretch on the testbed. When that leaves too few,
    both are taken over the whole stretch (predictions from its middle on).
    ``stretch_token_seconds`` is the median over the whole stretch, which the prediction at
    decision is compared with. The predictions compose the workers' timings under the
    stretch's conditions; they were never fitted to the stretch's token times except through
    the one per-message cost fitted over every window.
    ``decision_token_seconds`` is the prediction made when the placement was chosen, with its
    ``basis``: "decision" (calibrated from earlier measurements), "warm-up" (the placement the
    warm-up ran on, predicted after it) or "uncalibrated" (before anything was measured)."""
    decided = {d["epoch"]: (d["predicted_token_seconds"], "decision" if d.get("calibrated") else "uncalibrated")
               for d in run.decisions}
    if run.warmup and run.warmup.get("predicted_token_seconds"):
        decided[run.warmup["epoch"]] = (run.warmup["predicted_token_seconds"], "warm-up")
    out = []
    for epoch, first, end in segments(run):
        indices = range(max(first + SETTLE_TOKENS, 1), end)
        gaps = [run.arrivals[i] - run.arrivals[i - 1] for i in indices]
        if len(gaps) < MIN_SEGMENT_TOKENS:
            continue
        middle = run.arrivals[first] + (run.arrivals[end - 1] - run.arrivals[first]) / 2
        last = run.arrivals[end - 1] + (REPORT_LAG_SECONDS if end == len(run.arrivals) else 0.0)
        settled = max(middle, run.arrivals[first] + REPORT_LAG_SECONDS)
        polled = [p for t, e, p in run.predictions if e == epoch and settled <= t <= last]
        # the tokens those predictions speak for: from a report period before the first of them
        spoken = [g for i, g in zip(indices, gaps) if run.arrivals[i] >= settled - REPORT_LAG_SECONDS]
        if not polled or len(spoken) < MIN_SEGMENT_TOKENS:
            polled = [p for t, e, p in run.predictions if e == epoch and middle <= t <= last]
            spoken = gaps
        measured = statistics.median(spoken)
        guess = statistics.median(polled) if polled else None
        at_decision, basis = decided.get(epoch, (None, None))
        out.append({"epoch": epoch, "first_token": first, "tokens": len(gaps), "measured_token_seconds": measured,
                    "measured_tokens": len(spoken), "predicted_token_seconds": guess,
                    "predicted_over_measured": guess / measured if guess and measured > 0 else None,
                    "stretch_token_seconds": statistics.median(gaps),
                    "decision_token_seconds": at_decision, "basis": basis})
    return out


def summary(run: Run, profile: Profile, policy: str) -> dict:
    gaps = [b - a for a, b in zip(run.arrivals, run.arrivals[1:])]
    total = run.arrivals[-1] - run.arrivals[0] if len(run.arrivals) > 1 else 0.0
    return {"profile": profile.scenario.name, "policy": policy, "tokens": len(run.token_ids),
            "decode_seconds": total, "tokens_per_second": (len(gaps) / total) if total > 0 else None,
            "median_token_seconds": statistics.median(gaps) if gaps else None,
            "migrations": run.status.get("migrations"), "migrated_bytes": run.status.get("migrated_bytes"),
            "replans": len(run.decisions), "events": run.fired, "fidelity": fidelity(run),
            "token_ids": run.token_ids, "arrivals": run.arrivals, "epochs": run.epochs, "decisions": run.decisions,
            "warmup": run.warmup, "calibration": run.calibration,
            "predictions": [list(p) for p in run.predictions]}


def plot(record: dict, path: Path) -> Path | None:
    """Each token's time against its index, epochs as colours, events as vertical lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    arrivals = record["arrivals"]
    gaps_ms = [1000 * (b - a) for a, b in zip(arrivals, arrivals[1:])]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.scatter(range(1, len(arrivals)), gaps_ms, c=record["epochs"][1:], s=8, cmap="viridis")
    for event in record["events"]:
        ax.axvline(event["token"], color="crimson", lw=1, ls="--")
        ax.annotate(f"{event['kind']} {event['device']}", (event["token"], max(gaps_ms or [1])), rotation=90,
                    fontsize=7, va="top", ha="right", color="crimson")
    ax.set_xlabel("token")
    ax.set_ylabel("time since the previous token (ms)")
    ax.set_title(f"{record['profile']}: {record['policy']} ({record['tokens']} tokens, "
                 f"{record['migrations']} migrations; colour = placement epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--policy", default="resource-aware")
    p.add_argument("--tokens", type=int, default=None, help="new tokens (default: the profile's new_tokens)")
    p.add_argument("--prompt", default="Write a long story about a robot who learns to paint.")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="out")
    p.add_argument("--warmup", type=int, default=32, help="tokens of a warm-up generation first (0: none)")
    args = p.parse_args(argv)
    if os.geteuid() != 0 or not cgroup.available():
        print("the testbed needs root and cgroup v1's cpu controller (namespaces, tc, cgroups)", file=sys.stderr)
        return 2
    profile = load_profile(args.profile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Testbed(profile, args.policy, args.dtype, args.model) as bed:
        print(f"testbed up: {', '.join(f'{d} ({profile.cores[d]:.2f} cores)' for d in profile.devices)}",
              file=sys.stderr)
        run = generate(bed, args.prompt, args.tokens or profile.scenario.new_tokens, warmup_tokens=args.warmup)
    record = summary(run, profile, args.policy)
    stem = f"testbed-{profile.scenario.name}-{args.policy}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    picture = plot(record, out / f"{stem}.png")
    print(json.dumps({k: record[k] for k in ("policy", "tokens", "decode_seconds", "tokens_per_second",
                                              "migrations", "replans")}))
    for row in record["fidelity"]:
        print(f"epoch {row['epoch']} from token {row['first_token']}: predicted {row['predicted_token_seconds']} s "
              f"(at decision {row['decision_token_seconds']} s, {row['basis']}), measured "
              f"{row['measured_token_seconds']:.4f} s over {row['tokens']} tokens")
    if picture:
        print(f"plot: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
