"""Training with balancing interleaved: models, learning rules, monitors, run records."""

from .balancing import BalanceEvent, balance_model, unit_log_imbalance
from .bridge import layout_network, model_layout, write_network
from .config import (
                     BalancingConfig,
                     DataConfig,
                     ModelConfig,
                     MonitorConfig,
                     OptimizerConfig,
                     RegulariserConfig,
                     TrainConfig,
                     TrainerConfig,
)
from .data import Dataset, load_dataset, load_idx_dir, read_idx, stratified_subset
from .ensemble import ensemble_fallback_reason, train_ensemble
from .loop import RunResult, resolve_device, train_run
from .models import MLP, BalanceLayout, FFTransformer, ReluRNN, SmallCNN, build_model
from .rules import Backprop, FeedbackRule, make_rule
from .scenario import load_scenario, scenario_configs

__all__ = [
    "MLP", "Backprop", "BalanceEvent", "BalanceLayout", "BalancingConfig", "DataConfig",
    "Dataset", "FFTransformer", "FeedbackRule", "ModelConfig", "MonitorConfig",
    "OptimizerConfig", "RegulariserConfig", "ReluRNN", "RunResult", "SmallCNN", "TrainConfig",
    "TrainerConfig", "balance_model", "build_model", "ensemble_fallback_reason",
    "layout_network", "load_dataset",
    "load_idx_dir", "load_scenario", "make_rule", "model_layout", "read_idx", "resolve_device",
    "scenario_configs", "stratified_subset", "train_ensemble", "train_run",
    "unit_log_imbalance",
    "write_network",
]
