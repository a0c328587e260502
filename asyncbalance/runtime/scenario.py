"""Scenario files: validated frozen dataclasses, loaded with ``asyncbalance.config``.

A scenario says which network to balance, with which local rule, how units are split into
shards, how shards wake, how the links between them behave, which faults happen, when to
stop and which backend runs it. Times are in scenario time units: simulated time for the
simulator, ``ray.time_unit`` seconds each on Ray. A top-level ``[sweep]`` table of dotted keys
to lists turns a file into a grid of scenarios.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..activations import parse_activation
from ..config import apply_overrides, expand_sweep, from_mapping, load_toml
from ..errors import InvalidInputError
from ..io import load_npz
from ..network import (
    Network,
    layered_network,
    network_from_arrays,
    random_sparse_layer,
    recurrent_network,
)

BACKENDS = ("sim", "ray")
#: Longest scenario name: room for the run directory's date suffix and temporary prefixes.
MAX_NAME_BYTES = 200


def _positive(name: str, value: float) -> None:
    if not (np.isfinite(value) and value > 0):
        raise InvalidInputError(name, f"must be a finite number > 0, got {value!r}")


def _probability(name: str, value: float) -> None:
    # 1 is excluded: a link that loses or duplicates every message cannot make progress.
    if not (0.0 <= value < 1.0):
        raise InvalidInputError(name, f"must lie in [0, 1), got {value!r}")


@dataclass(frozen=True)
class NetworkConfig:
    """``mlp``: random MLP of ``sizes``; ``recurrent``: ``inputs -> hidden -> outputs`` with a
    dense recurrent matrix; ``file``: an .npz at ``path`` (layered or recurrent keys).

    Random weights are Gaussian with std ``gain / sqrt(fan_in)``, each unit's incoming row
    multiplied by ``exp(unit_spread * N(0, 1))`` so that the start is far from balance.
    ``density`` < 1 keeps each weight of a layered net with that probability (a sparse net:
    each neuron then has few neighbours, as in a large net at neuron granularity).
    ``sparse_mlp``: an MLP of ``sizes`` whose layer matrices are ``scipy.sparse`` CSR, each
    neuron linked to ``fan_in`` distinct random neurons of the layer below (all of them if
    that layer is smaller); weights Gaussian with std ``gain / sqrt(fan_in)`` and the same
    ``unit_spread``. No dense matrix is ever made, so 10^5 neurons with 10^7 synapses fit.
    """

    kind: Literal["mlp", "sparse_mlp", "recurrent", "file"] = "mlp"
    sizes: tuple[int, ...] = (16, 32, 32, 4)
    hidden: int = 12
    inputs: int = 4
    outputs: int = 3
    activation: str = "relu"
    bias: bool = True
    gain: float = 1.0
    unit_spread: float = 0.5
    density: float = 1.0
    fan_in: int = 16
    path: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        parse_activation(self.activation, "activation")
        if self.kind in ("mlp", "sparse_mlp") and (len(self.sizes) < 3 or min(self.sizes) < 1):
            raise InvalidInputError("sizes", "an MLP needs >= 3 positive layer sizes "
                                    f"(input, hidden..., output), got {list(self.sizes)}")
        for name in ("hidden", "inputs", "outputs"):
            if getattr(self, name) < 1:
                raise InvalidInputError(name, f"must be >= 1, got {getattr(self, name)}")
        _positive("gain", self.gain)
        if not (0.0 < self.density <= 1.0):
            raise InvalidInputError("density", f"must lie in (0, 1], got {self.density}")
        if self.kind == "sparse_mlp":
            if isinstance(self.fan_in, bool) or not self.fan_in >= 1:
                raise InvalidInputError("fan_in", f"must be an integer >= 1, got {self.fan_in}")
            if self.density != 1.0:
                raise InvalidInputError("density", "applies to kind = 'mlp' only; a "
                                        "'sparse_mlp' sets its connections with fan_in")
        if not (self.unit_spread >= 0):
            raise InvalidInputError("unit_spread", f"must be >= 0, got {self.unit_spread}")
        if self.kind == "file" and not self.path:
            raise InvalidInputError("path", "is required when kind = 'file'")


@dataclass(frozen=True)
class BalanceConfig:
    """The regulariser power ``p`` and the local rule (``alpha`` damps, ``eta`` is a step)."""

    p: float = 1.0
    rule: Literal["exact", "damped", "gradient"] = "exact"
    alpha: float = 0.5
    eta: float = 0.05

    def __post_init__(self) -> None:
        _positive("p", self.p)
        if not (0.0 < self.alpha <= 1.0):
            raise InvalidInputError("alpha", f"must lie in (0, 1], got {self.alpha}")
        _positive("eta", self.eta)


@dataclass(frozen=True)
class PartitionConfig:
    granularity: Literal["neuron", "shard"] = "shard"
    shards_per_layer: int = 1
    units_per_shard: int = 0

    def __post_init__(self) -> None:
        if self.shards_per_layer < 1:
            raise InvalidInputError("shards_per_layer", f"must be >= 1, got "
                                    f"{self.shards_per_layer}")
        if self.units_per_shard < 0:
            raise InvalidInputError("units_per_shard", "must be >= 0 (0 = use "
                                    f"shards_per_layer), got {self.units_per_shard}")


@dataclass(frozen=True)
class WakeConfig:
    kind: Literal["periodic", "poisson"] = "periodic"
    period: float = 1.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        _positive("period", self.period)
        if not (0.0 <= self.jitter < 1.0):
            raise InvalidInputError("jitter", f"must lie in [0, 1), got {self.jitter}")


@dataclass(frozen=True)
class LinksConfig:
    """Message delays (mean ``mean``), per-link heterogeneity, loss, duplication, re-sends."""

    delay: Literal["constant", "uniform", "exponential", "lognormal", "pareto"] = "exponential"
    mean: float = 0.5
    spread: float = 0.5
    pareto_shape: float = 2.5
    heterogeneity: float = 0.0
    loss: float = 0.0
    duplication: float = 0.0
    resend_interval: float = 5.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and self.mean >= 0):
            raise InvalidInputError("mean", f"must be a finite number >= 0, got {self.mean}")
        if not (0.0 <= self.spread <= (1.0 if self.delay == "uniform" else 5.0)):
            raise InvalidInputError("spread", f"must lie in [0, 1] for uniform and [0, 5] "
                                    f"otherwise, got {self.spread}")
        if not self.pareto_shape > 1.0:
            raise InvalidInputError("pareto_shape", "must be > 1 (else the mean is infinite), "
                                    f"got {self.pareto_shape}")
        if not (0.0 <= self.heterogeneity <= 5.0):
            raise InvalidInputError("heterogeneity", f"must lie in [0, 5], got "
                                    f"{self.heterogeneity}")
        _probability("loss", self.loss)
        _probability("duplication", self.duplication)
        _positive("resend_interval", self.resend_interval)


@dataclass(frozen=True)
class PartitionWindow:
    """Links between ``shards`` and every other shard are down during [start, stop)."""

    start: float
    stop: float
    shards: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.stop):
            raise InvalidInputError("stop", f"needs 0 <= start < stop, got [{self.start}, "
                                    f"{self.stop})")
        if not self.shards:
            raise InvalidInputError("shards", "must list at least one shard")


@dataclass(frozen=True)
class CrashConfig:
    """Shard ``shard`` crashes at ``at`` and restarts ``down_for`` later."""

    shard: int
    at: float
    down_for: float = 5.0
    restore: Literal["checkpoint", "zero"] = "checkpoint"

    def __post_init__(self) -> None:
        if self.at < 0:
            raise InvalidInputError("at", f"must be >= 0, got {self.at}")
        if self.down_for < 0:
            raise InvalidInputError("down_for", f"must be >= 0, got {self.down_for}")


@dataclass(frozen=True)
class FaultsConfig:
    partitions: tuple[PartitionWindow, ...] = ()
    crashes: tuple[CrashConfig, ...] = ()
    checkpoint_interval: float = 5.0

    def __post_init__(self) -> None:
        _positive("checkpoint_interval", self.checkpoint_interval)


@dataclass(frozen=True)
class StopConfig:
    """Stop when max |u - u*| <= ``tol`` or at a budget (time units, wall seconds, messages)."""

    tol: float = 1e-8
    max_time: float = 20_000.0
    max_wall_seconds: float = 300.0
    max_messages: int = 50_000_000
    sample_interval: float = 2.0
    function_check: Literal["every_sample", "final"] = "every_sample"

    def __post_init__(self) -> None:
        for name in ("tol", "max_time", "max_wall_seconds", "sample_interval"):
            _positive(name, getattr(self, name))
        if self.max_messages < 1:
            raise InvalidInputError("max_messages", f"must be >= 1, got {self.max_messages}")


@dataclass(frozen=True)
class RayConfig:
    """``address``: empty starts a local Ray (or uses RAY_ADDRESS); ``time_unit``: seconds per
    scenario time unit; ``clock``: ``paced`` plays the scenario's delays and wake draws in
    real time, ``free`` runs unpaced (shards act on news at once, no modelled delays);
    ``sample_seconds``: how often the coordinator polls the hosts; ``hosts``: shard host
    processes (0: one per CPU the cluster offers); ``actor_cpus``: CPUs reserved per host;
    ``max_in_flight``: batches outstanding per pair of hosts; ``transport``: how batches
    travel between hosts (``stream``: direct TCP links, ``calls``: Ray actor calls);
    ``checkpoint_seconds``: how often
    the driver collects checkpoints into the run directory; ``placement``: custom node
    resource names, host i goes to a node offering ``placement[i % len(placement)]`` (empty:
    hosts are spread over the nodes)."""

    address: str = ""
    time_unit: float = 0.001
    clock: Literal["paced", "free"] = "paced"
    sample_seconds: float = 0.05
    hosts: int = 0
    actor_cpus: float = 0.0
    max_in_flight: int = 8
    transport: Literal["stream", "calls"] = "stream"
    max_restarts: int = 1
    checkpoint_seconds: float = 1.0
    placement: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _positive("time_unit", self.time_unit)
        _positive("sample_seconds", self.sample_seconds)
        if self.hosts < 0:
            raise InvalidInputError("hosts", f"must be >= 0 (0 = one per CPU), got {self.hosts}")
        if self.actor_cpus < 0:
            raise InvalidInputError("actor_cpus", f"must be >= 0, got {self.actor_cpus}")
        if self.max_in_flight < 1:
            raise InvalidInputError("max_in_flight", f"must be >= 1, got {self.max_in_flight}")
        if self.max_restarts < 0:
            raise InvalidInputError("max_restarts", f"must be >= 0, got {self.max_restarts}")
        if not (self.checkpoint_seconds >= 0):
            raise InvalidInputError("checkpoint_seconds",
                                    f"must be >= 0, got {self.checkpoint_seconds}")
        if any(not name.strip() for name in self.placement):
            raise InvalidInputError("placement", "resource names must be non-empty strings")


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    description: str = ""
    seed: int = 0
    backend: Literal["sim", "ray"] = "sim"
    # true / "batches": one record per window of the array simulator (per message on Ray);
    # "messages": one record per message everywhere; false: no event log.
    record_events: bool | Literal["batches", "messages"] = True
    network: NetworkConfig = field(default_factory=NetworkConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    wake: WakeConfig = field(default_factory=WakeConfig)
    links: LinksConfig = field(default_factory=LinksConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\\0"):
            raise InvalidInputError("name", f"must be a non-empty file-name-safe string, got "
                                    f"{self.name!r}")
        if len(self.name.encode()) > MAX_NAME_BYTES or self.name in (".", ".."):
            # It names the default run directory (NAME-YYYYmmdd-HHMMSS-N); file names are
            # limited to 255 bytes.
            raise InvalidInputError("name", f"must be a file name of at most {MAX_NAME_BYTES} "
                                    f"bytes, got {len(self.name.encode())} bytes")
        if self.seed < 0:
            raise InvalidInputError("seed", f"must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class ScenarioPoint:
    """One runnable scenario; ``sweep`` holds the swept keys and values (empty if none)."""

    scenario: Scenario
    sweep: dict[str, Any]
    base_dir: Path | None = None


def load_scenarios(path: str | Path, overrides: Sequence[str] = (),
                   progress: Callable[[int, int], None] | None = None) -> list[ScenarioPoint]:
    """Read a scenario file, apply ``--set`` overrides, expand the sweep and validate each point.

    Every point is validated before anything runs, so a mistake anywhere in a sweep is
    reported before any output is written. ``progress(done, total)`` is told how far the
    validation got, every 1,000 points (a 10^5-point sweep takes ~20 s to check).
    """
    data = apply_overrides(load_toml(path), overrides)
    base_dir = Path(path).resolve().parent
    raws = expand_sweep(data)
    points = []
    for i, raw in enumerate(raws):
        if progress is not None and i % 1000 == 0 and len(raws) > 1000:
            progress(i, len(raws))
        sweep = raw.pop("_sweep_point", {})
        points.append(ScenarioPoint(from_mapping(Scenario, raw), sweep, base_dir))
    return points


def scenario_from_mapping(data: dict[str, Any]) -> Scenario:
    return from_mapping(Scenario, data)


def build_network(config: NetworkConfig, base_dir: Path | None = None) -> Network:
    """The network a scenario describes (random ones are reproducible from ``config.seed``)."""
    rng = np.random.default_rng(config.seed)
    if config.kind == "file":
        path = Path(config.path)
        if not path.is_absolute() and base_dir is not None and not path.is_file():
            path = base_dir / path
        return network_from_arrays(load_npz(path, "network.path"), config.activation)

    def matrix(n_out: int, n_in: int) -> np.ndarray:
        w = rng.standard_normal((n_out, n_in)) * config.gain / np.sqrt(n_in)
        return w * np.exp(config.unit_spread * rng.standard_normal((n_out, 1)))

    if config.kind == "mlp":
        sizes = config.sizes
        weights = [matrix(o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        if config.density < 1.0:
            # Drawn after the dense weights, so density = 1 reproduces earlier networks.
            weights = [w * (rng.random(w.shape) < config.density) for w in weights]
        biases = [0.1 * rng.standard_normal(o) if config.bias else None for o in sizes[1:]]
        return layered_network(weights, biases, config.activation)
    if config.kind == "sparse_mlp":
        sizes = config.sizes
        layers = [random_sparse_layer(rng, o, i, config.fan_in, config.gain, config.unit_spread)
                  for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
        biases = [0.1 * rng.standard_normal(o) if config.bias else None for o in sizes[1:]]
        return layered_network(layers, biases, config.activation)
    n = config.hidden
    w_in = matrix(n, config.inputs)
    w_rec = 0.5 * matrix(n, n)
    w_out = matrix(config.outputs, n)
    b = 0.1 * rng.standard_normal(n) if config.bias else None
    b_out = 0.1 * rng.standard_normal(config.outputs) if config.bias else None
    return recurrent_network(w_in, w_rec, w_out, b, b_out, config.activation)
