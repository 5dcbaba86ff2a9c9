"""The fault-injecting proxy; it ships as :mod:`cloudckpt.testing.faults` (one implementation)."""

from cloudckpt.testing.faults import FaultProxy, Rule, Seen

__all__ = ["FaultProxy", "Rule", "Seen"]
