"""Scaling with the traffic: the autoscaler's decision (decide.py), a pure function."""

from pleaco.scale.decide import METRICS, AutoscalePolicy, Decision, PolicyError, Sample, decide

__all__ = ["METRICS", "AutoscalePolicy", "Decision", "PolicyError", "Sample", "decide"]
