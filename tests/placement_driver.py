"""Driver run as a subprocess by the placement test: a 3-node local cluster, one scenario with
every shard pinned to node 2 by its custom resource; prints a JSON report."""

from __future__ import annotations

import json
import sys

import ray

from actors.cluster import NODE_RESOURCE_PREFIX, LocalCluster
from asyncbalance.runtime.coordinator import run_scenario
from asyncbalance.runtime.scenario import load_scenarios


def main(scenario_path: str, out_dir: str) -> None:
    target = f"{NODE_RESOURCE_PREFIX}2"
    points = load_scenarios(scenario_path, [f'ray.placement=["{target}"]'])
    with LocalCluster(nodes=3, cpus_per_node=1.0) as cluster:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        summary = run_scenario(points[0].scenario, out_dir, backend="ray",
                               address=cluster.address, base_dir=points[0].base_dir)
        report = {"node_ids": cluster.node_ids(), "shard_nodes": summary["shard_nodes"],
                  "converged": summary["converged"],
                  "function_max_rel_error": summary["function_max_rel_error"]}
        ray.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
