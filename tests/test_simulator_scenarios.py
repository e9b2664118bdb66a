"""Scenario format, generator and the simulate CLI."""

import argparse
import json

import pytest
import yaml

from edgeheads.controller import simulate_cli
from edgeheads.controller.scenario import FAMILIES, ScenarioError, generate, load_scenario, materialize, parse_scenario

SMALL = {
    "name": "t",
    "seed": 3,
    "model": {"shape": {"arch": "llama", "n_layers": 2, "hidden_size": 64, "n_heads": 4, "n_kv_heads": 2,
                        "head_dim": 16, "intermediate_size": 128, "vocab_size": 100}},
    "prompt_tokens": 4,
    "new_tokens": 12,
    "interval_tokens": 3,
    "devices": {"explicit": [
        {"name": "a", "memory_bytes": 1.0e6, "peak_flops_per_second": 1.0e9},
        {"name": "b", "memory_bytes": 1.0e6, "peak_flops_per_second": 2.0e9},
    ]},
    "links": {"bandwidth_bytes_per_second": {"value": 1.0e7}, "latency_seconds": {"value": 0.001},
              "pairs": [{"source": "a", "destination": "b", "bandwidth_bytes_per_second": 5.0e6, "latency_seconds": 0.002}]},
}


def cli(argv):
    parser = argparse.ArgumentParser(prog="edgeheads")
    simulate_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def write(tmp_path, data, name="s.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_materialize_applies_pairs_and_seed():
    setup = materialize(parse_scenario(SMALL))
    assert setup.cluster.names == ("a", "b")
    assert setup.cluster.bandwidth_bytes_per_second[0, 1] == 5.0e6
    assert setup.cluster.bandwidth_bytes_per_second[1, 0] == 1.0e7
    assert setup.shape.n_layers == 2 and len(setup.demand.blocks) == 2 * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_generated_families_are_valid_and_reproducible(family):
    assert generate(family, 5) == generate(family, 5)
    scenario = parse_scenario(yaml.safe_load(yaml.safe_dump(generate(family, 5))))
    setup = materialize(scenario)
    assert setup.cluster.n_devices >= 2 and len(setup.demand.blocks) > 0


def test_the_paper_medium_family_has_the_papers_ranges():
    scenario = parse_scenario(generate("paper-medium", 5))
    setup = materialize(scenario)
    mem = setup.cluster.memory_bytes
    flops = setup.cluster.peak_flops_per_second
    assert setup.cluster.n_devices == 25 and scenario.new_tokens == 1000
    assert mem.min() >= 2e9 and mem.max() <= 8e9 and flops.min() >= 5e9 and flops.max() <= 5e10


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("model"), "model"),
        (lambda d: d.update(prompt_tokens=-1), "prompt_tokens"),
        (lambda d: d.update(model={"name": "nope"}), "unknown model name"),
        (lambda d: d.update(model={"shape": {"arch": "llama"}}), "model.shape"),
        (lambda d: d.update(memory_gb=3), "memory_gb"),
        (lambda d: d["links"].update(bandwidth_bytes_per_second={"value": 1, "uniform": [1, 2]}), "exactly one"),
        (lambda d: d["links"]["pairs"][0].update(source="zz"), "unknown device"),
        (lambda d: d.update(headnode_device="zz"), "headnode_device"),
    ],
)
def test_bad_scenarios_give_clear_messages(mutate, message, tmp_path, capsys):
    data = json.loads(json.dumps(SMALL))
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ScenarioError, match=message):
        materialize(load_scenario(path))
    assert cli(["simulate", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["- just\n- a list\n", "name: [unclosed\n", ""])
def test_unreadable_files(text, tmp_path, capsys):
    assert cli(["simulate", str(write(tmp_path, text))]) == 2
    assert cli(["simulate", str(tmp_path / "missing.yaml")]) == 2
    assert "edgeheads simulate:" in capsys.readouterr().err


def test_unknown_algorithm(tmp_path, capsys):
    assert cli(["simulate", str(write(tmp_path, SMALL)), "--algorithms", "resource-aware,magic"]) == 2
    assert "magic" in capsys.readouterr().err


def test_json_and_plots(tmp_path, capsys):
    path = write(tmp_path, SMALL)
    assert cli(["simulate", str(path), "--algorithms", "resource-aware,static,exact", "--json", "--plot", str(tmp_path / "p")]) == 0
    out = json.loads(capsys.readouterr().out)
    runs = out["algorithms"]
    assert set(runs) == {"resource-aware", "static", "exact"}
    for run in runs.values():
        assert run["summary"]["tokens"] == 12 and len(run["per_token"]["latency_seconds"]) == 12
    assert runs["static"]["summary"]["migrations"] == 0
    assert runs["exact"]["summary"]["total_latency_seconds"] <= runs["resource-aware"]["summary"]["total_latency_seconds"] * 1.5
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["latency_vs_step.png", "memory_sum_vs_step.png", "memory_vs_step.png"]


def test_table_output_and_generate(tmp_path, capsys):
    assert cli(["simulate", "--generate", "paper-small", "--count", "2", "--seed", "4", "--out", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.yaml"))
    assert [f.name for f in files] == ["paper-small-4.yaml", "paper-small-5.yaml"]
    capsys.readouterr()
    assert cli(["simulate", str(files[0]), "--algorithms", "resource-aware,greedy"]) == 0
    table = capsys.readouterr().out
    assert "resource-aware" in table and "greedy" in table
    assert cli(["simulate"]) == 2
