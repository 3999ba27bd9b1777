"""The simulated upstream: a stand-in for ``GET /api/work`` with configurable latency,
failures and hangs, for ``make run``, the tests and the benchmark. Not part of the
service: nothing in ``smart`` imports it. ``python -m simulator --help`` lists its options.
"""

from simulator.process import SimulatorError, SimulatorProcess

__all__ = ["SimulatorError", "SimulatorProcess"]
