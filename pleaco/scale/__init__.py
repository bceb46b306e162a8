"""Scaling with the traffic: the autoscaler's decision (decide.py), a pure function."""

from pleaco.scale.decide import METRICS, WAKE_REASON, AutoscalePolicy, Decision, PolicyError, Sample, decide, woken

__all__ = ["METRICS", "WAKE_REASON", "AutoscalePolicy", "Decision", "PolicyError", "Sample", "decide", "woken"]
