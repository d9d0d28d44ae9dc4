"""scripts/simulate_swarm: a seed gives one report, and the simulated swarm keeps the
link budget (with the project's link policy, and with the simulator's stand-in).

Small swarms and short phases (seconds of CPU each); the figures themselves are
the benchmark's (docs/BENCHMARKS.md), not asserted here beyond what must hold.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from simulate_swarm_lib.links import REAL_MODULE, Real, StandIn, policy_for
from simulate_swarm_lib.model import SimConfig
from simulate_swarm_lib.sizes import Sizes, measure
from simulate_swarm_lib.swarm import Swarm

REPO = Path(__file__).resolve().parents[1]
SEED = 20261203

# A small swarm whose budget binds (8 links, where a node would take more), with
# enough churn that nodes join and leave within the short churn phase.
SMALL = SimConfig(
    nodes=60, seed=SEED, warmup_s=20.0, rest_s=10.0, churn_s=40.0, churn_per_min=0.3, max_links=8
)


@pytest.fixture(scope="module")
def sizes() -> Sizes:
    return measure()


def run(config: SimConfig, sizes: Sizes, stand_in: bool = False) -> tuple[Swarm, dict[str, Any]]:
    swarm = Swarm(config, sizes)
    if stand_in:
        swarm.world.policy = StandIn(max_links=config.max_links)
    return swarm, swarm.run()


@pytest.fixture(scope="module")
def small(sizes: Sizes) -> tuple[Swarm, dict[str, Any]]:
    print(f"seed {SEED}")
    return run(SMALL, sizes)


def test_the_project_policy_is_used_when_it_exists() -> None:
    present = importlib.util.find_spec(REAL_MODULE) is not None
    assert isinstance(policy_for(32), Real if present else StandIn)


def test_a_seed_gives_one_result(sizes: Sizes, small: tuple[Swarm, dict[str, Any]]) -> None:
    first = small[1]
    _, again = run(SMALL, sizes)
    assert first == again
    _, other = run(SimConfig(**{**_fields(SMALL), "seed": SEED + 1}), sizes)
    assert other != first  # the seed does draw the run


@pytest.mark.parametrize("stand_in", [False, True], ids=["policy", "stand-in"])
def test_no_node_goes_over_max_links(
    sizes: Sizes, small: tuple[Swarm, dict[str, Any]], stand_in: bool
) -> None:
    print(f"seed {SEED}")
    swarm, result = run(SMALL, sizes, stand_in) if stand_in else small
    world = swarm.world
    assert result["joins"] > 0 and result["leaves"] > 0
    assert result["links_peak"] <= SMALL.max_links
    for phase in ("rest", "churn"):
        assert result[phase]["over_budget"] == 0
        assert result[phase]["links_max"] <= SMALL.max_links
        assert result[phase]["links_median"] >= 2  # links were made at all
        assert result[phase]["jobs"] > 0
    # Links are mutual between live nodes (a node that left holds nothing anyone sees).
    for n in world.live:
        node = world.nodes[n]
        assert len(node.links) <= SMALL.max_links
        for j in node.links:
            if world.nodes[j].alive:
                assert n in world.nodes[j].links
    # A new node's first job was routed, to a live provider, after a DHT lookup.
    first = result["first_job"]
    assert first["new_nodes"] > 0
    assert first["rounds_max"] is not None and 1 <= first["rounds_max"] <= 20
    assert result["rest"]["jobs_live_pct"] == 100.0  # nobody leaves at rest


def test_the_script_prints_the_same_report_for_a_seed(tmp_path: Path) -> None:
    args = [sys.executable, str(REPO / "scripts" / "simulate_swarm.py"), "--quick"]
    args += ["--sizes", "30", "--seed", "7", "--no-plot", "--json", str(tmp_path / "a.json")]
    out = [
        subprocess.run(args, capture_output=True, text=True, timeout=300, check=True) for _ in "ab"
    ]
    assert out[0].stdout == out[1].stdout
    assert "seed 7" in out[0].stdout and "== 30 nodes (seed 7) ==" in out[0].stdout
    assert "targets (issue 13):" in out[0].stdout
    assert (tmp_path / "a.json").exists()


def _fields(config: SimConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__dataclass_fields__}
