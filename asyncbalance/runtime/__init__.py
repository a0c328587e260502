"""The asynchronous balancing runtime: shard logic, messages, simulator, coordinator, records.

No Ray import here: the Ray backend lives in the top-level ``actors`` package and is loaded
only when a scenario asks for it.
"""

from .coordinator import FUNCTION_TOL, Problem, prepare, run_points, run_scenario
from .events import EVENT_FIELDS, EventWriter, read_events
from .messages import StateMessage, decode_message, encode_message
from .partition import GRANULARITIES, partition_units
from .record import SUMMARY_KEYS, Sample, read_summary
from .scenario import Scenario, ScenarioPoint, build_network, load_scenarios
from .shard import RULES, Rule, Shard, ShardSpec, build_shard_specs, gather_log_scales
from .simulator import MessageCounters, Simulator

__all__ = [
    "EVENT_FIELDS", "FUNCTION_TOL", "GRANULARITIES", "RULES", "SUMMARY_KEYS", "EventWriter",
    "MessageCounters", "Problem", "Rule", "Sample", "Scenario", "ScenarioPoint", "Shard",
    "ShardSpec", "Simulator", "StateMessage", "build_network", "build_shard_specs",
    "decode_message", "encode_message", "gather_log_scales", "load_scenarios",
    "partition_units", "prepare", "read_events", "read_summary", "run_points", "run_scenario",
]
