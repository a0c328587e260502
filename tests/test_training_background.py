"""Background balancing on hosts through the sampler thread, and the monitor schedule.

The sampler's boundary never waits on a host; what it applies must still add up: without a
reload the increments taken at successive boundaries sum to the shards' state, which
reaches the optimum of the loaded costs (1e-8, the runtime's tolerance). After a reload with
other costs, nothing of the old generation may be applied: the increments from then on sum
to the new costs' optimum.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from asyncbalance.config import from_mapping
from asyncbalance.errors import InvalidInputError
from asyncbalance.graph import build_cost_graph
from asyncbalance.optimum import solve_optimum
from asyncbalance.regularisers import lp
from asyncbalance.runtime.scenario import NetworkConfig, build_network
from asyncbalance.training.balancing import AsyncBalancer
from asyncbalance.training.config import BalancingConfig, ModelConfig, TrainConfig
from asyncbalance.training.data import Dataset
from asyncbalance.training.loop import SeedRun

OPTIMUM_TOL = 1e-8  # the runtime's convergence tolerance on log-scales
WAIT_SECONDS = 60.0  # generous: the hosts converge in well under a second when idle


def _graph(seed: int):
    network = build_network(NetworkConfig(sizes=(5, 8, 8, 3), unit_spread=1.0, seed=seed))
    return build_cost_graph(network, lp(1.0))


def _take_until(balancer: AsyncBalancer, graph, target: np.ndarray, total: np.ndarray,
                step: int) -> tuple[np.ndarray, int]:
    """Take increments (a boundary every few ms) until their sum reaches ``target``."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        result, _ = balancer.take(graph, step, 0.0)
        total = total + result.log_scales
        step += 1
        if np.max(np.abs(total - target)) <= OPTIMUM_TOL or time.monotonic() > deadline:
            return total, step
        time.sleep(0.005)  # the training thread's gradient steps, in between boundaries


@pytest.mark.ray
@pytest.mark.parametrize("clock", ["paced", "free"])
def test_sampled_increments_add_up_and_never_mix_generations(ray_session, clock: str) -> None:
    first, second = _graph(0), _graph(1)
    assert first.n_units == second.n_units
    balancer = AsyncBalancer("ray", 1, 0, reload_every=1, clock=clock)
    assert balancer.scenario.ray.clock == clock
    try:
        zero, staleness = balancer.take(first, 0, 0.0)  # starts the hosts on `first`
        assert balancer.sampler is not None and staleness == 0
        assert not np.any(zero.log_scales)
        total, step = _take_until(balancer, first, solve_optimum(first).log_scales,
                                  np.zeros(first.n_units), 1)
        assert np.max(np.abs(total - solve_optimum(first).log_scales)) <= OPTIMUM_TOL
        # New costs: from here on only the new generation's moves may be applied.
        balancer.refresh(second, step)
        total, step = _take_until(balancer, second, solve_optimum(second).log_scales,
                                  np.zeros(second.n_units), step)
        assert np.max(np.abs(total - solve_optimum(second).log_scales)) <= OPTIMUM_TOL
        assert balancer.sampler.loads == 1 and balancer.sampler.samples > 0
    finally:
        balancer.close()
    assert balancer.sampler is None and balancer.runtime is None


def _tiny_data() -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.random((40, 16)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    return Dataset(x[:32], y[:32], x[32:], y[32:], (1, 4, 4), 3, "synthetic")


def test_the_run_gives_its_balancer_the_host_clock() -> None:
    """``async_clock`` reaches the Ray scenario of the run's balancer (paced by default)."""
    for clock in (None, "paced", "free"):
        extra = {} if clock is None else {"async_clock": clock}
        config = TrainConfig(epochs=1, model=ModelConfig(kind="mlp", widths=(0, 4, 0)),
                             balancing=BalancingConfig(mode="background", async_backend="ray",
                                                       **extra))
        state = SeedRun(config, 0, _tiny_data(), torch.device("cpu"))
        assert state.balancer is not None
        assert state.balancer.scenario.ray.clock == (clock or "paced")
        state.balancer.close()


def test_an_unknown_host_clock_is_refused_with_the_choices() -> None:
    with pytest.raises(InvalidInputError) as raised:
        from_mapping(TrainConfig, {"balancing": {"async_clock": "fast"}})
    message = str(raised.value)
    assert "async_clock" in message and "paced" in message and "free" in message


class _StubSampler:
    """Hands out whatever sample the test sets (generation, log-scales, updates)."""

    def __init__(self, n_units: int) -> None:
        self.latest = (0, np.zeros(n_units), 0)
        self.requests: list[int] = []

    def sample(self):
        return self.latest

    def request_load(self, generation: int, graph) -> None:
        self.requests.append(generation)

    def stop(self) -> None:
        pass


def test_a_boundary_applies_only_moves_of_the_loaded_generation() -> None:
    graph = _graph(0)
    n = graph.n_units
    balancer = AsyncBalancer("ray", 1, 0, reload_every=1)
    stub = _StubSampler(n)
    balancer.runtime, balancer.sampler = object(), stub  # started; the stub stands in
    balancer.applied = np.zeros(n)
    rng = np.random.default_rng(0)
    first, second = rng.normal(size=n), rng.normal(size=n)
    stub.latest = (0, first, 10)
    result, _ = balancer.take(graph, 5, 0.0)
    assert np.array_equal(result.log_scales, first) and result.iterations == 10
    balancer.refresh(graph, 5)
    assert stub.requests == [1]
    # the hosts still answer with generation 0: nothing of it may be applied any more
    result, staleness = balancer.take(graph, 7, 0.0)
    assert not np.any(result.log_scales) and staleness == 2
    stub.latest = (1, second, 20)
    result, _ = balancer.take(graph, 9, 0.0)
    assert np.array_equal(result.log_scales, second)
    stub.latest = (1, second + first, 30)
    result, _ = balancer.take(graph, 11, 0.0)
    assert np.allclose(result.log_scales, first, rtol=0, atol=1e-12)
    balancer.runtime = None
    balancer.close()


class _SlowReloadRuntime:
    """The runtime's public interface with a reload that takes 20 ms (a busy host)."""

    def __init__(self, specs) -> None:
        self.specs, self.updates, self.reloads = specs, 0, 0

    def elapsed(self) -> float:
        return 0.0

    def advance(self, until: float) -> float:
        self.updates += 1
        return until

    def owned_log_scales(self):
        return [np.full(spec.n_own, 0.5) for spec in self.specs]

    def message_counters(self):
        from types import SimpleNamespace
        return SimpleNamespace(unit_updates=self.updates)

    def reload(self, specs) -> None:
        time.sleep(0.02)
        self.specs, self.reloads = list(specs), self.reloads + 1


def test_reloads_faster_than_the_hosts_take_them_do_not_starve_the_samples() -> None:
    from asyncbalance.runtime import build_shard_specs, partition_units
    from asyncbalance.training.background import BackgroundSampler

    graph = _graph(0)
    specs = build_shard_specs(graph, partition_units(graph, "shard", 1))
    runtime = _SlowReloadRuntime(specs)
    sampler = BackgroundSampler(runtime, specs, graph.n_units, 1, interval=0.005)
    try:
        for generation in range(1, 41):  # a request every 2 ms, 10x faster than a reload
            sampler.request_load(generation, graph)
            time.sleep(0.002)
        latest = sampler.settled(40, timeout=10.0)
    finally:
        sampler.stop()
    assert latest[0] == 40 and np.any(latest[1])  # the last generation got sampled
    # every load but the last was followed by a sample of its generation before the next
    assert sampler.loads >= 2 and sampler.samples >= sampler.loads
