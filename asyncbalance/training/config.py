"""Training scenarios as validated frozen dataclasses (loaded with ``asyncbalance.config``).

A scenario file holds one ``TrainConfig`` (top-level keys plus the ``[data]``, ``[model]``,
``[trainer]``, ``[optimizer]``, ``[regulariser]``, ``[balancing]`` and ``[monitor]`` tables),
optionally ``[sweep]`` (a grid of dotted keys), ``[settings.<label>]`` and
``[variants.<label>]`` (labelled tables of dotted-key overrides). Every combination of sweep
point, setting and variant is run for every seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import InvalidInputError

DATASETS = ("fashion_mnist", "idx", "digits", "circles")
MODELS = ("mlp", "rnn", "cnn", "transformer")
RULES = ("backprop", "dfa", "fa")
OPTIMISERS = ("sgd", "adam")
REGULARISERS = ("none", "l1", "l2")
BALANCE_MODES = ("none", "partial", "full", "async")
FULL_METHODS = ("exact", "full", "alternating", "stochastic")
DEVICES = ("auto", "cpu", "cuda")
TRANSFORMER_PARTS = ("ff",)
SCALINGS = ("unit", "symmetric")
OPTIMIZER_STATES = ("transform", "keep", "reset")


@dataclass(frozen=True)
class DataConfig:
    """Which data set, how much of it, and the mini-batch size.

    ``fraction`` keeps a stratified, seeded subset of the training set (class proportions
    preserved, at least one sample per class); the test set is always complete.
    """

    name: Literal["fashion_mnist", "idx", "digits", "circles"] = "digits"
    dir: str = ""
    fraction: float = 1.0
    batch_size: int = 64
    test_fraction: float = 0.25
    n_samples: int = 1000
    noise: float = 0.1
    factor: float = 0.5
    split_seed: int = 0
    # "unit": pixels in [0, 1]; "symmetric": [-1, 1] (Normalize(0.5, 0.5), the papers' code)
    scaling: Literal["unit", "symmetric"] = "unit"
    # > 0: hold out this share of the (subsetted) training set, stratified and seeded by
    # split_seed, and evaluate on it instead of the test set (learning-rate selection)
    validation_fraction: float = 0.0
    # >= 2: hold out fold ``validation_fold`` (0 .. k-1) of a stratified k-fold partition
    # of the (subsetted) training set, drawn with split_seed, instead (over the k folds
    # every training sample is held out once)
    validation_folds: int = 0
    validation_fold: int = 0
    # the seed of the ``fraction`` subset: -1, the run's seed (each seed its own subset);
    # >= 0, that subset for every run (a k-fold over one subset)
    subset_seed: int = -1

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise InvalidInputError("data.scaling", f"unknown scaling {self.scaling!r}",
                                    SCALINGS)
        if not (0.0 <= self.validation_fraction < 1.0):
            raise InvalidInputError("data.validation_fraction",
                                    f"must be in [0, 1), got {self.validation_fraction}")
        if self.validation_folds == 1 or self.validation_folds < 0:
            raise InvalidInputError("data.validation_folds",
                                    f"must be 0 (off) or >= 2, got {self.validation_folds}")
        if not 0 <= self.validation_fold < max(self.validation_folds, 1):
            raise InvalidInputError("data.validation_fold", f"must be in 0 .. "
                                    f"{max(self.validation_folds, 1) - 1} (data.validation_folds"
                                    f" = {self.validation_folds}), got {self.validation_fold}")
        if self.subset_seed < -1:
            raise InvalidInputError("data.subset_seed",
                                    f"must be -1 (the run's seed) or >= 0, got {self.subset_seed}")
        if self.validation_folds and self.validation_fraction:
            raise InvalidInputError("data.validation_folds", "and data.validation_fraction "
                                    "both hold out a validation set: set one of them")
        if not (0.0 < self.fraction <= 1.0):
            raise InvalidInputError("fraction", f"must be in (0, 1], got {self.fraction}")
        if self.batch_size < 1:
            raise InvalidInputError("batch_size", f"must be >= 1, got {self.batch_size}")
        if not (0.0 < self.test_fraction < 1.0):
            raise InvalidInputError("test_fraction",
                                    f"must be in (0, 1), got {self.test_fraction}")
        if self.n_samples < 4:
            raise InvalidInputError("n_samples", f"must be >= 4, got {self.n_samples}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture. ``widths`` (MLP) includes the input and output sizes, e.g. [64, 32, 10];
    0 entries at either end are filled from the data set."""

    kind: Literal["mlp", "rnn", "cnn", "transformer"] = "mlp"
    widths: tuple[int, ...] = (0, 64, 0)
    activation: str = "relu"
    bias: bool = True
    hidden: int = 64
    channels: tuple[int, ...] = (8, 16)
    d_model: int = 32
    heads: int = 2
    d_ff: int = 64
    blocks: int = 1
    ff_activation: str = "relu"
    balance_parts: tuple[str, ...] = ("ff",)

    def __post_init__(self) -> None:
        if self.kind == "mlp":
            if len(self.widths) < 2:
                raise InvalidInputError("widths", "needs at least input and output sizes")
            if any(w < 0 for w in self.widths) or any(w == 0 for w in self.widths[1:-1]):
                raise InvalidInputError("widths", f"hidden widths must be >= 1: {self.widths}")
        for name in ("hidden", "d_model", "heads", "d_ff", "blocks"):
            if getattr(self, name) < 1:
                raise InvalidInputError(name, f"must be >= 1, got {getattr(self, name)}")
        if any(c < 1 for c in self.channels) or len(self.channels) != 2:
            raise InvalidInputError("channels", f"needs two positive channel counts, got "
                                    f"{self.channels}")
        if self.d_model % self.heads:
            raise InvalidInputError("heads", f"d_model {self.d_model} is not divisible by "
                                    f"{self.heads} heads")


FEEDBACK_DISTRIBUTIONS = ("uniform", "normal")
FEEDBACK_LAYERS = ("independent", "shared")


@dataclass(frozen=True)
class FeedbackConfig:
    """How DFA/FA feedback matrices are drawn (``[trainer.feedback]``).

    ``distribution``: uniform in [-s, s] or normal N(0, s^2), s = trainer.feedback_scale /
    sqrt(fan). ``layers``: independent (one draw per layer) or shared (one matrix of the
    largest shape, each layer using its leading slice). ``seed``: -1 draws from the run's
    seed (different feedback per seed), >= 0 fixes the feedback across runs.
    """

    distribution: Literal["uniform", "normal"] = "uniform"
    layers: Literal["independent", "shared"] = "independent"
    seed: int = -1

    def __post_init__(self) -> None:
        if self.distribution not in FEEDBACK_DISTRIBUTIONS:
            raise InvalidInputError("trainer.feedback.distribution",
                                    f"unknown distribution {self.distribution!r}",
                                    FEEDBACK_DISTRIBUTIONS)
        if self.layers not in FEEDBACK_LAYERS:
            raise InvalidInputError("trainer.feedback.layers", f"unknown value {self.layers!r}",
                                    FEEDBACK_LAYERS)
        if self.seed < -1:
            raise InvalidInputError("trainer.feedback.seed", f"must be >= -1, got {self.seed}")


@dataclass(frozen=True)
class TrainerConfig:
    """Learning rule. Feedback matrices are uniform in [-s, s] (or as ``feedback`` says) with
    ``s = feedback_scale / sqrt(fan)``: fan = n_outputs for DFA (B_l: hidden_l x n_out),
    fan = the layer's input width for FA (B_l shaped like W_l; for a conv layer its
    in_channels x kernel size), as torch's Linear init."""

    rule: Literal["backprop", "dfa", "fa"] = "backprop"
    feedback_scale: float = 1.0
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)

    def __post_init__(self) -> None:
        if not self.feedback_scale > 0:
            raise InvalidInputError("feedback_scale", f"must be > 0, got {self.feedback_scale}")


@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    # the learning rate is multiplied by lr_decay after every epoch (StepLR, step 1)
    lr_decay: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InvalidInputError("lr", f"must be > 0, got {self.lr}")
        if not (0.0 < self.lr_decay <= 1.0):
            raise InvalidInputError("optimizer.lr_decay",
                                    f"must be in (0, 1], got {self.lr_decay}")
        if not (0.0 <= self.momentum < 1.0):
            raise InvalidInputError("momentum", f"must be in [0, 1), got {self.momentum}")


@dataclass(frozen=True)
class RegulariserConfig:
    """Penalty ``strength * sum |w|^p`` (p = 1 or 2) added to the loss, biases included when
    ``include_biases`` (the bias is an edge from the bias unit, as in the balancing cost)."""

    kind: Literal["none", "l1", "l2"] = "none"
    strength: float = 0.0
    include_biases: bool = True

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise InvalidInputError("strength", f"must be >= 0, got {self.strength}")


@dataclass(frozen=True)
class BalancingConfig:
    """Balancing during training, independent of the regulariser.

    ``mode``: none; partial (one layer-wise sweep); full (to the unique optimum with
    ``full_method``, max log-imbalance <= ``tol``); async (layer shards in the runtime's
    seeded event simulator for ``async_budget`` units of simulated time, with
    ``async_shards`` shards per layer; the runtime's default delays and wake period 1; with
    ``async_backend = "ray"`` the shards run on Ray shard hosts, created once per run, and
    ``async_budget`` is in time units of 10 ms); background (the runtime's shards keep
    balancing while gradient steps run; at each boundary the log-scales they reached since
    the last one are applied to the current weights, and every ``async_reload_every``
    boundaries the shards get the current weights' costs; on the simulator, each boundary
    advances it by ``async_budget``).
    ``async_clock`` (Ray hosts): ``paced`` plays the runtime's delays and wake draws at
    10 ms per time unit; ``free`` lets the hosts balance as fast as they can (messages
    applied as they leave) and rest once nothing changes.
    ``every`` k ``unit`` (epoch or step); ``at_start`` adds a full balance before training.
    """

    mode: Literal["none", "partial", "full", "async", "background"] = "none"
    every: int = 1
    unit: Literal["epoch", "step"] = "epoch"
    p: float = 2.0
    at_start: bool = False
    full_method: Literal["exact", "full", "alternating", "stochastic"] = "exact"
    direction: Literal["forward", "backward"] = "forward"
    tol: float = 1e-10
    async_budget: float = 50.0
    async_shards: int = 1
    async_backend: Literal["sim", "ray"] = "sim"
    async_reload_every: int = 1
    async_clock: Literal["paced", "free"] = "paced"
    # momentum / Adam moments of the rescaled weights: transform (/s, /s^2), keep or reset
    optimizer_state: Literal["transform", "keep", "reset"] = "transform"
    # false: balance the weights only, ignoring biases (the papers' code); this changes the
    # function of a biased network, which function_rel_error then measures
    include_biases: bool = True
    # p of the at_start full balance (0: the same p as the interleaves)
    start_p: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise InvalidInputError("balancing.optimizer_state",
                                    f"unknown mode {self.optimizer_state!r}", OPTIMIZER_STATES)
        if self.start_p < 0:
            raise InvalidInputError("balancing.start_p", f"must be >= 0, got {self.start_p}")
        if self.every < 1:
            raise InvalidInputError("every", f"must be >= 1, got {self.every}")
        if self.async_reload_every < 1:
            raise InvalidInputError("async_reload_every",
                                    f"must be >= 1, got {self.async_reload_every}")
        if not self.p > 0:
            raise InvalidInputError("p", f"must be > 0, got {self.p}")
        if not self.async_budget > 0:
            raise InvalidInputError("async_budget", f"must be > 0, got {self.async_budget}")
        if self.async_shards < 1:
            raise InvalidInputError("async_shards", f"must be >= 1, got {self.async_shards}")
        if not self.tol > 0:
            raise InvalidInputError("tol", f"must be > 0, got {self.tol}")

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.at_start


@dataclass(frozen=True)
class MonitorConfig:
    """What is measured at each balancing interleave and each epoch.

    ``probe_size`` test inputs form the float64 function-preservation probe; ``optimum``
    solves the central optimum at every interleave (distance max|u - u*|); ``alignment``
    measures the angle between the trainer's update and the backprop gradient;
    ``unit_norms`` records per-unit in/out norms every epoch (small networks only).

    ``check_every`` samples the boundary monitors (the float64 function check on the probe
    and the central optimum): they run at every k-th balancing boundary of the run (the
    first one included; 0: never by count), and at the last boundary of every epoch when
    ``check_epoch_end``. 1 (the default) checks every boundary.
    """

    probe_size: int = 256
    optimum: bool = True
    conservation: bool = True
    alignment: bool = True
    unit_norms: bool = False
    alignment_batch: int = 256
    # evaluate and record a row every k epochs (and at the last epoch)
    eval_every: int = 1
    check_every: int = 1
    check_epoch_end: bool = True

    def __post_init__(self) -> None:
        if self.check_every < 0:
            raise InvalidInputError("monitor.check_every",
                                    f"must be >= 0, got {self.check_every}")
        if self.eval_every < 1:
            raise InvalidInputError("monitor.eval_every", f"must be >= 1, got {self.eval_every}")
        if self.probe_size < 1:
            raise InvalidInputError("probe_size", f"must be >= 1, got {self.probe_size}")


@dataclass(frozen=True)
class TrainConfig:
    name: str = "train"
    seeds: int = 1
    first_seed: int = 0
    epochs: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    label: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    regulariser: RegulariserConfig = field(default_factory=RegulariserConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise InvalidInputError("seeds", f"must be >= 1, got {self.seeds}")
        if self.epochs < 0:
            raise InvalidInputError("epochs", f"must be >= 0, got {self.epochs}")
