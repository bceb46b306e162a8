"""The reconcile loops: desired state in the store against what is real on this host."""

from pleaco.reconcile.apps import AppReconciler

__all__ = ["AppReconciler"]
