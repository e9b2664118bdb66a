"""The emulated edge testbed (deploy/testbed/): profiles, the network plan, and the small run CI
does: 3 workers in their own network namespaces with shaped links and CPU quotas, 64 tokens
of SmolLM2 under the paper's resource-aware policy with a CPU hog started and stopped on one
board, tokens identical to the in-process engine, and a predicted/measured record."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeheads.controller.scenario import ScenarioError

TESTBED = Path(__file__).resolve().parents[1] / "deploy" / "testbed"
sys.path.insert(0, str(TESTBED))

import testbed_cgroup  # noqa: E402
import testbed_net  # noqa: E402
from testbed_profile import load_profile, parse_profile  # noqa: E402

CI_PROFILE = TESTBED / "profiles" / "ci-trio.yaml"
BASE = {"name": "t", "model": {"name": "smollm2-135m"}, "prompt_tokens": 8, "new_tokens": 16,
        "devices": {"explicit": [{"name": "a", "memory_bytes": 1e9, "peak_flops_per_second": 1e9},
                                 {"name": "b", "memory_bytes": 2e9, "peak_flops_per_second": 4e9}]},
        "links": {"bandwidth_bytes_per_second": {"value": 1.25e7},
                  "pairs": [{"source": "a", "destination": "b", "bandwidth_bytes_per_second": 1e6,
                             "latency_seconds": 0.0}]}}


def test_a_stretch_is_predicted_from_the_reports_that_describe_it():
    """The fidelity record of a stretch: the median gap between its tokens beside the
    predictions polled over its second half, but not before a report period into it (a report
    speaks for the period before it) and, but for the run's last stretch, not after it."""
    import testbed

    lag = testbed.REPORT_LAG_SECONDS
    run = testbed.Run()
    run.arrivals = [lag / 10 * i for i in range(80)]  # ten tokens a report period
    run.epochs = [1] * 60 + [2] * 20
    run.fired = [{"token": 30}]  # a hog from token 30: two stretches of epoch 1
    # what the controller predicts: from the warm-up before the run (200 ms) until a report on
    # the run arrives; from the first report after the hog began, which mixes in the hog (300 ms)
    def epoch_1(t):
        return 0.2 if t < lag else 0.1 if t < 3.1 * lag else 0.3
    polls = [i * lag / 40 for i in range(400)]
    run.predictions = [(t, 1, epoch_1(t)) for t in polls if t < 6 * lag] + \
                      [(t, 2, 0.05 if t < 7 * lag else 0.5) for t in polls if t >= 6 * lag]
    rows = {row["first_token"]: row for row in testbed.fidelity(run)}
    assert rows[0]["measured_token_seconds"] == pytest.approx(lag / 10)
    assert rows[0]["predicted_token_seconds"] == pytest.approx(0.1)  # not the reports on the hog
    assert rows[30]["predicted_token_seconds"] == pytest.approx(0.3)
    # the last stretch: up to a period after its last token, as the run keeps polling
    assert rows[60]["predicted_token_seconds"] == pytest.approx(0.5)
    # a stretch whose tokens slow down five-fold after 30: its second half is measured over the
    # tokens its predictions speak for, its whole over all
    drift = testbed.Run()
    drift.arrivals = [lag / 10 * i for i in range(30)] + [2.9 * lag + lag / 2 * i for i in range(1, 11)]
    drift.epochs = [1] * 40
    drift.predictions = [(t, 1, 0.5) for t in polls]
    (row,) = testbed.fidelity(drift)
    assert row["measured_token_seconds"] == pytest.approx(lag / 2) and row["measured_tokens"] == 10
    assert row["stretch_token_seconds"] == pytest.approx(lag / 10) and row["tokens"] == 38


def test_a_profile_is_a_scenario_with_events():
    """Compute relative to the fastest device, memory limits, directed link rates, and events from
    both the scenario's scripted load and the testbed's own list, in token order."""
    profile = parse_profile({**BASE, "testbed": {"max_cores": 1.5, "events": [
        {"at_token": 9, "kind": "leave", "device": "a"}]}, "background": {"events": [
            {"device": "b", "start_token": 5, "end_token": 7, "compute_fraction": 0.5, "memory_fraction": 0.25}]}})
    assert profile.cores == {"a": 1.5 / 4, "b": 1.5}  # relative to the fastest device
    assert profile.memory == {"a": 10**9, "b": 2 * 10**9}
    assert profile.rates == {("a", "b"): 1e6, ("b", "a"): 1.25e7}  # directed: listed pair, else the default
    assert [(e.at_token, e.kind, e.device, e.memory_bytes) for e in profile.events] == [
        (5, "cpu_hog", "b", None), (5, "memory_limit", "b", 1.5e9), (7, "cpu_hog_stop", "b", None),
        (7, "memory_limit", "b", 2e9), (9, "leave", "a", None)]
    ci = load_profile(CI_PROFILE)
    assert ci.devices == ["pi4", "pi5", "jetson"] and ci.scenario.new_tokens == 64 and len(ci.events) == 2
    for path in (TESTBED / "profiles").glob("*.yaml"):  # every profile is a scenario simulate runs too
        done = subprocess.run([sys.executable, "-m", "edgeheads.headnode.cli", "simulate", str(path),
                               "--algorithms", "resource-aware,static"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (path.name, done.stderr[-2000:])


@pytest.mark.parametrize("change,message", [
    ({"testbed": {"events": [{"at_token": 1, "kind": "cpu_hog", "device": "zz"}]}}, "unknown device 'zz'"),
    ({"testbed": {"events": [{"at_token": 1, "kind": "memory_limit", "device": "a"}]}}, "needs memory_bytes"),
    ({"testbed": {"events": [{"at_token": 1, "kind": "join", "device": "a"}]}}, "not under testbed.standby"),
    ({"testbed": {"events": [{"at_token": 1, "kind": "explode", "device": "a"}]}}, "kind"),
    ({"testbed": {"max_core": 1}}, "max_core"),
    ({"testbed": {"max_cores": 0}}, "max_cores"),
    ({"devices": {"count": 2, "memory_bytes": {"value": 1e9}, "peak_flops_per_second": {"value": 1e9}}},
     "devices.explicit"),
])
def test_bad_profiles_are_refused_with_a_reason(change, message):
    with pytest.raises(ScenarioError, match=message):
        parse_profile({**BASE, **change})


def test_every_directed_link_is_shaped_once_at_its_sender():
    a, b = testbed_net.Endpoint("a", 0), testbed_net.Endpoint("b", 1)
    rates = {("a", "b"): 1e6, ("b", "a"): 2e6, ("headnode", "a"): 3e6}
    commands = [" ".join(c) for c in testbed_net.plan_commands([a, b], rates, relay_port=None)]
    classes = [c for c in commands if " class add " in c and "classid 1:1 " not in c]
    # a -> b at a's namespace egress, b -> a at b's, hub -> a on a's root-side veth; nothing else
    assert len(classes) == 3
    assert any(f"netns exec {a.namespace} " in c and "rate 8000000bit" in c for c in classes)
    assert any(f"netns exec {b.namespace} " in c and "rate 16000000bit" in c for c in classes)
    assert any(c.startswith("tc ") and f"dev {a.host_veth} " in c and "rate 24000000bit" in c for c in classes)
    filters = [c for c in commands if " filter add " in c]
    assert any(f"match ip dst {b.address}/32" in c and a.ns_veth in c for c in filters)
    assert any(f"match ip src {testbed_net.HUB}/32" in c and a.host_veth in c for c in filters)


def test_relay_traffic_goes_first_on_every_shaped_link():
    a, b = testbed_net.Endpoint("a", 0), testbed_net.Endpoint("b", 1)
    rates = {("a", "b"): 1e6, ("headnode", "a"): 3e6}
    commands = [" ".join(c) for c in testbed_net.plan_commands([a, b], rates, relay_port=50062)]
    for dev, rate in ((a.ns_veth, "8000000bit"), (a.host_veth, "24000000bit")):
        mine = [c for c in commands if f"dev {dev} " in c]
        link = [c for c in mine if " class add " in c and "parent 1: " in c and "classid 1:1 " not in c]
        assert len(link) == 1 and f"rate {rate} ceil {rate}" in link[0]
        minor = link[0].split("classid ")[1].split()[0]
        leaves = {c.split("classid ")[1].split()[0]: c for c in mine if f"parent {minor} " in c}
        relay, bulk = leaves[minor + "1"], leaves[minor + "2"]
        assert "prio 0" in relay and f"rate {rate} ceil {rate}" in relay
        assert "prio 1" in bulk and f"ceil {rate}" in bulk and f"rate {rate} " not in bulk  # it borrows
        filters = [c for c in mine if " filter add " in c]
        to_relay = [c for c in filters if c.endswith(f"flowid {minor}1")]
        assert {"sport" if "sport 50062" in c else "dport" for c in to_relay} == {"sport", "dport"}
        assert all(" prio 1 " in c for c in to_relay)
        assert [c for c in filters if c.endswith(f"flowid {minor}2") and " prio 2 " in c and "50062" not in c]


@pytest.mark.system
def test_small_testbed_run_is_exact_and_records_predictions(require_capability, smollm2_gguf, tmp_path):
    require_capability("root", os.geteuid() == 0)
    require_capability("cgroup v1's cpu controller", testbed_cgroup.available())
    require_capability("ip and tc", bool(shutil.which("ip") and shutil.which("tc")))
    import testbed

    from edgeheads.headnode.loading import load_model
    from edgeheads.headnode.local import LocalGenerator
    from edgeheads.headnode.sampling import SamplingParams

    profile = load_profile(CI_PROFILE)
    prompt = "Write a long story about a robot who learns to paint."
    with testbed.Testbed(profile, "resource-aware", dtype="fp32") as bed:
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert all(e.namespace in names for e in bed.endpoints.values())
        run = testbed.generate(bed, prompt, profile.scenario.new_tokens, warmup_tokens=12)
        groups = {name: g.path for name, g in bed.groups.items()}
        namespaces = [e.namespace for e in bed.endpoints.values()]
    record = testbed.summary(run, profile, "resource-aware")
    local = LocalGenerator(load_model(str(smollm2_gguf), "fp32", progress=False))
    want = local.generate(prompt, SamplingParams(max_new_tokens=profile.scenario.new_tokens, stop_on_eos=False),
                          chat=False).token_ids
    assert run.token_ids == want
    assert [(e["kind"], e["device"], e["token"], e["error"]) for e in record["events"]] == [
        ("cpu_hog", "jetson", 24, None), ("cpu_hog_stop", "jetson", 48, None)]
    assert record["fidelity"], "no placement decoded long enough to be measured"
    for row in record["fidelity"]:
        assert row["decision_token_seconds"] and row["decision_token_seconds"] > 0
        assert row["measured_token_seconds"] > 0 and row["tokens"] >= testbed.MIN_SEGMENT_TOKENS
        # after the warm-up every prediction is calibrated from measurements
        assert row["basis"] in ("warm-up", "decision"), row
    # the stretches are cut at the hog's start and stop, and the controller was asked as they ran
    assert {0, 24, 48} <= {row["first_token"] for row in record["fidelity"]}
    assert any(row["predicted_token_seconds"] for row in record["fidelity"])
    # the controller learned from the workers' timed blocks and the head node's steps
    calibration = record["calibration"]
    assert set(calibration["kind_factors"]) == {"attn", "proj", "ffn"}
    assert calibration["kind_factors"]["ffn"] == 1.0 and calibration["kind_factors"]["attn"] > 0
    assert calibration["windows"] >= 1 and calibration["head_seconds"] > 0
    assert record["warmup"]["predicted_token_seconds"] > 0
    assert testbed.plot(record, tmp_path / "timeline.png").stat().st_size > 0
    # nothing is left behind: namespaces, bridge, CPU groups
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(namespace in names for namespace in namespaces)
    assert not any(path.exists() for path in groups.values())
