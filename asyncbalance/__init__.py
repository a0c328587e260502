"""asyncbalance: synaptic neural balance, exact, local and asynchronous.

Public API. Everything not listed here is an implementation detail.
"""

from .activations import Activation, parse_activation
from .balance import BalanceReport, balance_network
from .errors import (
    BalanceError,
    InvalidInputError,
    NonConvergenceError,
    NotHomogeneousError,
)
from .forward import forward, function_rel_error, probe_inputs
from .graph import Block, CostGraph, build_cost_graph
from .kernels import (
    exact_moves,
    gradient,
    hessian_vector_product,
    log_imbalance,
    max_log_imbalance,
    move_cost_decrease,
    total_cost,
    unit_flows,
)
from .network import (
    Connection,
    Network,
    UnitGroup,
    layered_network,
    network_from_arrays,
    recurrent_network,
    scale_network,
)
from .optimum import Certificate, solve_optimum
from .regularisers import Regulariser, elastic_net, lp
from .runtime import (
    Scenario,
    load_scenarios,
    read_events,
    read_summary,
    run_points,
    run_scenario,
)
from .schedules import (
    METHODS,
    ScheduleResult,
    alternating_sweep,
    balance_units,
    gradient_flow_step,
    layer_sweep,
    run_schedule,
    stochastic_sweep,
    tied_closed_form,
    tied_closed_form_log_scales,
    tied_sweep,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Activation",
    "BalanceError",
    "BalanceReport",
    "Block",
    "Certificate",
    "Connection",
    "CostGraph",
    "InvalidInputError",
    "Network",
    "NonConvergenceError",
    "NotHomogeneousError",
    "Regulariser",
    "Scenario",
    "ScheduleResult",
    "UnitGroup",
    "alternating_sweep",
    "balance_network",
    "balance_units",
    "build_cost_graph",
    "elastic_net",
    "exact_moves",
    "forward",
    "function_rel_error",
    "gradient",
    "gradient_flow_step",
    "hessian_vector_product",
    "layer_sweep",
    "layered_network",
    "load_scenarios",
    "log_imbalance",
    "lp",
    "max_log_imbalance",
    "move_cost_decrease",
    "network_from_arrays",
    "parse_activation",
    "probe_inputs",
    "read_events",
    "read_summary",
    "recurrent_network",
    "run_points",
    "run_scenario",
    "run_schedule",
    "scale_network",
    "solve_optimum",
    "stochastic_sweep",
    "tied_closed_form",
    "tied_closed_form_log_scales",
    "tied_sweep",
    "total_cost",
    "unit_flows",
]
