"""The HELIOS policy: model registry, shortlist, live profiling, partial loading, breach monitor,
adaptation and the memory -> batch rule, as plain code over telemetry (no Ray)."""

from .controller import HeliosPolicy, PolicyEvent, Target
from .monitor import BreachMonitor
from .pht import PerformanceHistoryTable, ProfileRow, StepFit, fit_steps
from .planner import Limits, PolicyConfig, estimate, exit_walk, partial_depth, shortlist, thin_exits
from .registry import ModelEntry, OfflineProfile, Registry, RegistryError

__all__ = ["BreachMonitor", "HeliosPolicy", "Limits", "ModelEntry", "OfflineProfile", "PerformanceHistoryTable",
           "PolicyConfig", "PolicyEvent", "ProfileRow", "Registry", "RegistryError", "StepFit", "Target", "estimate",
           "exit_walk", "fit_steps", "partial_depth", "shortlist", "thin_exits"]
