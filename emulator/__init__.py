"""Emulators for tests, the demo and benchmarks: the Moondream Batch API (seed 002) and, on the
same port, fal's queue API for the Moondream endpoints (``emulator.fal``) and the Moondream
real-time API (``emulator.realtime``)."""

if __name__ != "moonbatch.emulator":  # one module, one name: never two Celery apps or two Settings
    raise ImportError(f"import moonbatch.emulator, not {__name__}")

try:  # the demo extra's: workers never need it
    import flask  # noqa: F401
except ImportError as exc:
    raise ImportError("the emulator (moonbatch demo, moonbatch emulator) needs Flask, in moonbatch's "
                      "demo extra: pip install 'moonbatch[demo]'") from exc

from moonbatch.emulator.fal import FAL_FAULT_KINDS, FalConfig, FalFaults
from moonbatch.emulator.realtime import (
    REALTIME_FAULT_KINDS,
    RealtimeConfig,
    RealtimeFaults,
    expected_answer,
    expected_usage,
)
from moonbatch.emulator.server import FAULT_KINDS, Emulator, EmulatorConfig, EmulatorServer, Faults

__all__ = ["FAL_FAULT_KINDS", "FAULT_KINDS", "Emulator", "EmulatorConfig", "EmulatorServer",
           "FalConfig", "FalFaults", "Faults", "REALTIME_FAULT_KINDS", "RealtimeConfig",
           "RealtimeFaults", "expected_answer", "expected_usage"]
