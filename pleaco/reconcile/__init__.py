"""The reconcile loops: desired state in the store against what is real on this host.

The runner and the shape of a loop: pleaco.reconcile.loop.
"""
