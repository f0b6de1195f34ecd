"""An emulator of the Moondream Batch API (seed 002) for tests, the demo and benchmarks."""

from emulator.server import Emulator, EmulatorConfig, EmulatorServer

__all__ = ["Emulator", "EmulatorConfig", "EmulatorServer"]
