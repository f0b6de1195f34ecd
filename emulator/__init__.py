"""An emulator of the Moondream Batch API (seed 002) for tests, the demo and benchmarks."""

from emulator.server import FAULT_KINDS, Emulator, EmulatorConfig, EmulatorServer, Faults

__all__ = ["FAULT_KINDS", "Emulator", "EmulatorConfig", "EmulatorServer", "Faults"]
