"""One balancing interleave: move log-scales, check the function in float64, write back.

The balancing itself is the engine's: ``build_cost_graph`` + ``run_schedule`` (or the
central Newton optimum) + ``scale_network``. Around it this module measures what a
researcher needs to trust the step: the float64 function change on a probe batch, the cost
before/after/at the optimum, the distance ``max |u - u*|`` to the unique optimum (also when a
partial sweep stops short of it) and the per-unit imbalance before and after.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..errors import InvalidInputError, ResultOverflowError
from ..graph import CostGraph, build_cost_graph
from ..network import scale_network
from ..optimum import solve_optimum
from ..schedules import ScheduleResult, run_schedule
from .background import BackgroundSampler
from .bridge import layout_network, model_layout, write_network
from .models import BalanceLayout
from .rescaling import rescale_optimizer_state


@dataclass(frozen=True)
class BalanceEvent:
    """What one balancing interleave did (all figures in float64)."""

    kind: str
    iterations: int
    function_rel_error: float
    function_rel_error_float32: float
    cost_before: float
    cost_after: float
    cost_optimum: float
    distance_to_optimum: float
    max_log_imbalance_before: float
    max_log_imbalance_after: float
    median_log_imbalance_before: float
    seconds: float
    # Background balancing: gradient steps between the weights whose costs the shards were
    # balancing and the weights the log-scales were applied to (None for other kinds).
    staleness_steps: int | None = None
    # Wall seconds of the monitors (float64 function check, central optimum), apart from
    # ``seconds``; ``checked`` is False at a boundary where the schedule skipped them (then
    # the function errors and the distance are NaN).
    monitor_seconds: float = 0.0
    checked: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _outputs(model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(probe)
    finally:
        model.train(was_training)


def relative_change(reference: torch.Tensor, changed: torch.Tensor) -> float:
    """``max |changed - reference| / max |reference|`` (0/0 counts as 0)."""
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    diff = float((changed - reference).abs().max()) if reference.numel() else 0.0
    return diff / scale if scale > 0 else diff


def balance_model(model: nn.Module, p: float, kind: str, probe: torch.Tensor | None = None,
                  tol: float = 1e-10, full_method: str = "exact", direction: str = "forward",
                  with_optimum: bool = True, seed: int = 0, async_budget: float = 50.0,
                  async_shards: int = 1, async_backend: str = "sim",
                  optimizer: torch.optim.Optimizer | None = None,
                  optimizer_state: str = "transform",
                  balancer: AsyncBalancer | None = None, step: int = 0,
                  rescale_state: Callable[[BalanceLayout, np.ndarray], None] | None = None,
                  ) -> BalanceEvent:
    """Balance ``model`` in place under L_p: ``kind`` is ``partial`` (one layer-wise sweep),
    ``full`` (to the optimum with ``full_method``, max log-imbalance <= tol) or ``async``
    (the runtime for ``async_budget`` scenario time units: through ``balancer``, which keeps
    its runtime for the whole training run, or a one-off runtime of ``async_backend``).
    With an ``optimizer``, its state for the rescaled parameters follows ``optimizer_state``
    (transform / keep / reset, see ``asyncbalance.optim_state``).

    ``rescale_state(layout, u)``, when given, replaces that (an ensemble's optimiser holds
    the stacked parameters, not the member's).

    With a ``probe`` batch, the function change is measured on a float64 copy of the model
    (the balancing's own error) and on the model itself (float32 rounding of the new weights).
    Their cost and the optimum's are ``monitor_seconds``, apart from ``seconds``.
    """
    start = time.perf_counter()
    layout = model_layout(model)
    network = layout_network(layout)
    graph = build_cost_graph(network, p)
    u0 = np.zeros(graph.n_units)
    if kind == "partial":
        result = run_schedule(graph, "partial", tol=tol, direction=direction)
    elif kind == "async":
        result = (balancer.balance(graph, async_budget) if balancer is not None else
                  async_balance(graph, async_budget, async_shards, seed, async_backend))
    elif kind == "background":
        if balancer is None:
            raise InvalidInputError("balancing.mode", "'background' needs a balancer that "
                                    "lives for the whole training run (AsyncBalancer)")
        result, staleness = balancer.take(graph, step, async_budget,
                                          settle=probe is not None or with_optimum)
    else:
        result = run_schedule(graph, full_method, tol=tol, seed=seed)
    u = result.log_scales
    try:
        balanced = scale_network(network, u)
    except ResultOverflowError as exc:
        # The scales follow from the regulariser's power: name the key that chose it.
        raise InvalidInputError("balancing.p", f"p = {p:g} balances to weights that cannot be "
                                f"represented ({str(exc).split(': ', 1)[-1]}); choose a "
                                "larger p") from None
    imbalance_before = np.abs(kernels.log_imbalance(graph, u0))
    seconds = time.perf_counter() - start
    monitor_start = time.perf_counter()
    cost_opt, distance = float("nan"), float("nan")
    if with_optimum:
        # The reference optimum comes from another algorithm than the result, so that the
        # distance measures something: exact layer sweeps check Newton's own result.
        if kind == "full" and full_method == "exact":
            reference = run_schedule(graph, "full", tol=1e-12)
            u_star, cost_opt = reference.log_scales, reference.cost
        else:
            cert = solve_optimum(graph, tol=1e-12)
            u_star, cost_opt = cert.log_scales, cert.cost
        distance = float(np.max(np.abs(u - u_star))) if u.size else 0.0
    err64 = err32 = float("nan")
    if probe is not None:
        twin = copy.deepcopy(model).to(torch.float64)
        probe64 = probe.to(torch.float64)
        reference = _outputs(twin, probe64)
        write_network(model_layout(twin), balanced)
        err64 = relative_change(reference, _outputs(twin, probe64))
        before32 = _outputs(model, probe)
    monitor_seconds = time.perf_counter() - monitor_start
    start_write = time.perf_counter()
    write_network(layout, balanced)
    if rescale_state is not None:
        rescale_state(layout, u)
    else:
        rescale_optimizer_state(optimizer, layout, u, optimizer_state)
    if kind == "background" and balancer is not None:
        # The shards go on from the weights as they are now, every few boundaries.
        balancer.refresh(lambda: build_cost_graph(balanced, p), step)
    seconds += time.perf_counter() - start_write
    if probe is not None:
        monitor_start = time.perf_counter()
        err32 = relative_change(before32.double(), _outputs(model, probe).double())
        monitor_seconds += time.perf_counter() - monitor_start
    return BalanceEvent(
        kind=kind, iterations=int(result.iterations), function_rel_error=err64,
        function_rel_error_float32=err32, cost_before=float(kernels.total_cost(graph, u0)),
        cost_after=float(result.cost), cost_optimum=cost_opt, distance_to_optimum=distance,
        max_log_imbalance_before=float(imbalance_before.max()) if u.size else 0.0,
        max_log_imbalance_after=float(result.max_log_imbalance),
        median_log_imbalance_before=float(np.median(imbalance_before)) if u.size else 0.0,
        seconds=seconds, staleness_steps=staleness if kind == "background" else None,
        monitor_seconds=monitor_seconds, checked=probe is not None or with_optimum)


class AsyncBalancer:
    """Asynchronous balancing through ``asyncbalance.runtime`` for a whole training run.

    Layer shards exchange log-scales over delayed links (the runtime's default link and wake
    model) for ``budget`` scenario time units per interleave, then the coordinator gathers
    the owners' log-scales. ``backend = "sim"``: the seeded event simulator, rebuilt in-process
    at each interleave. Any other backend (``"ray"``: shard hosts on the Ray this process is
    connected to, or a local one) is created once, at the first interleave; later interleaves
    only send each host the new costs of the rows and columns it owns (a new generation, every
    shard at u = 0) and let it run. ``close`` releases it.
    """

    def __init__(self, backend: str = "sim", shards_per_layer: int = 1, seed: int = 0,
                 time_unit: float = 0.01, reload_every: int = 1,
                 sample_seconds: float = 0.02, clock: str = "paced"):
        from ..runtime.backends import backend_factory
        from ..runtime.scenario import RayConfig, Scenario

        self.factory = backend_factory(backend, "balancing.async_backend")
        self.backend = backend
        self.shards_per_layer = shards_per_layer
        self.scenario = Scenario(seed=seed, backend=backend, record_events=False,
                                 ray=RayConfig(time_unit=time_unit, clock=clock))
        self.runtime: Any = None
        self.partition: list[np.ndarray] | None = None
        self.interleaves = 0
        self.runtimes_created = 0
        # Wall seconds spent creating runtimes (Ray: starting the host processes), once per
        # run in background mode: reported apart from the steady cost per boundary.
        self.runtime_start_seconds = 0.0
        self.reload_every = reload_every
        self.boundaries = 0
        self.specs: list[Any] = []
        self.applied = np.zeros(0)
        self.loaded_at = 0
        # Background mode on hosts: a thread samples them every sample_seconds (0: the
        # boundary polls them itself); generation counts the costs handed to it.
        self.sample_seconds = sample_seconds
        self.settle_seconds = 1.0
        self.sampler: BackgroundSampler | None = None
        self.generation = 0

    def balance(self, graph: CostGraph, budget: float) -> ScheduleResult:
        from ..runtime import build_shard_specs, gather_log_scales, partition_units
        from ..runtime.events import EventWriter

        start = time.perf_counter()
        partition = partition_units(graph, "shard", self.shards_per_layer)
        specs = build_shard_specs(graph, partition)
        same_shards = self.partition is not None and len(partition) == len(self.partition) \
            and all(np.array_equal(a, b) for a, b in zip(partition, self.partition,
                                                         strict=True))
        if self.backend == "sim" or self.runtime is None or not same_shards:
            self.close()
            created = time.perf_counter()
            self.runtime = self.factory(specs, self.scenario, EventWriter(None))
            self.runtimes_created += 1
            self.runtime.start()
            self.runtime_start_seconds += time.perf_counter() - created
            began = 0.0
        else:
            self.runtime.reload(specs)
            began = self.runtime.elapsed()
        self.partition = partition
        self.runtime.advance(began + budget)
        u = gather_log_scales(graph.n_units, specs, self.runtime.owned_log_scales())
        updates = self.runtime.message_counters().unit_updates
        if self.backend == "sim":
            self.close()
        self.interleaves += 1
        return ScheduleResult(u, int(updates), kernels.max_log_imbalance(graph, u),
                              kernels.total_cost(graph, u), time.perf_counter() - start,
                              "async")

    def take(self, graph: CostGraph, step: int, budget: float, settle: bool = False
             ) -> tuple[ScheduleResult, int]:
        """Background mode: the log-scales the shards moved since the last ``take`` (to
        apply to the current weights) and the steps since their costs were loaded.

        The first call starts the shards on ``graph`` and returns zeros. Hosts (Ray) run
        between calls on their own and a ``BackgroundSampler`` thread keeps their latest
        log-scales, so ``take`` reads that sample and never waits on a host; until the hosts
        hold the costs of the last ``refresh``, nothing is applied. With ``settle`` (a
        checked boundary: the epoch's end under sampled monitors) it waits, at most
        ``settle_seconds``, for a fresh sample of the current costs instead. The simulator is
        advanced by ``budget`` here.
        """
        from ..runtime import gather_log_scales

        start = time.perf_counter()
        if self.runtime is None:
            self._load(graph, step)
            u = np.zeros(graph.n_units)
            staleness = 0
            updates = self.runtime.message_counters().unit_updates
        elif self.sampler is not None:
            generation, reached, updates = self.sampler.settled(
                self.generation, self.settle_seconds) if settle else self.sampler.sample()
            if generation == self.generation:
                u = reached - self.applied
                self.applied = reached
            else:
                u = np.zeros(graph.n_units)  # the requested costs are not loaded yet
            staleness = step - self.loaded_at
        else:
            began = self.runtime.elapsed() if hasattr(self.runtime, "elapsed") \
                else self.runtime.now
            self.runtime.advance(began + (budget if self.backend == "sim" else 0.0))
            reached = gather_log_scales(graph.n_units, self.specs,
                                        self.runtime.owned_log_scales())
            u = reached - self.applied
            self.applied = reached
            staleness = step - self.loaded_at
            updates = self.runtime.message_counters().unit_updates
        self.interleaves += 1
        return (ScheduleResult(u, int(updates), kernels.max_log_imbalance(graph, u),
                               kernels.total_cost(graph, u), time.perf_counter() - start,
                               "background"), staleness)

    def refresh(self, graph: CostGraph | Callable[[], CostGraph], step: int) -> None:
        """Background mode: give the shards ``graph`` (the weights as they are now; a
        callable is called only then) every ``reload_every`` boundaries."""
        self.boundaries += 1
        if self.boundaries % self.reload_every:
            return
        graph = graph() if callable(graph) else graph
        if self.sampler is not None:
            self.generation += 1
            self.applied = np.zeros(graph.n_units)
            self.loaded_at = step
            self.sampler.request_load(self.generation, graph)
        else:
            self._load(graph, step)

    def _load(self, graph: CostGraph, step: int) -> None:
        from ..runtime import build_shard_specs, partition_units
        from ..runtime.events import EventWriter

        partition = partition_units(graph, "shard", self.shards_per_layer)
        self.specs = build_shard_specs(graph, partition)
        if self.runtime is not None and self.backend != "sim":
            self.runtime.reload(self.specs)
        else:
            self.close()
            created = time.perf_counter()
            self.runtime = self.factory(self.specs, self.scenario, EventWriter(None))
            self.runtimes_created += 1
            self.runtime.start()
            self.runtime_start_seconds += time.perf_counter() - created
            if self.backend != "sim" and self.sample_seconds > 0:
                self.generation = 0
                self.sampler = BackgroundSampler(self.runtime, self.specs, graph.n_units,
                                                 self.shards_per_layer, self.sample_seconds)
        self.partition = partition
        self.applied = np.zeros(graph.n_units)
        self.loaded_at = step

    def close(self) -> None:
        sampler, self.sampler = self.sampler, None
        if sampler is not None:
            sampler.stop()
        runtime, self.runtime = self.runtime, None
        if runtime is not None:
            runtime.close()


def async_balance(graph: CostGraph, budget: float, shards_per_layer: int = 1,
                  seed: int = 0, backend: str = "sim") -> ScheduleResult:
    """One asynchronous balancing with a runtime of its own (see ``AsyncBalancer``)."""
    balancer = AsyncBalancer(backend, shards_per_layer, seed)
    try:
        return balancer.balance(graph, budget)
    finally:
        balancer.close()


def unit_log_imbalance(model: nn.Module, p: float) -> np.ndarray:
    """Per-unit ``log(A_k / (c_k B_k))`` of the model as it is (0 at dead units)."""
    graph = build_cost_graph(layout_network(model_layout(model)), p)
    return kernels.log_imbalance(graph, np.zeros(graph.n_units))
