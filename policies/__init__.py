"""Balloon policies: the Policy protocol (``policies.api``), the registry and the built-ins.

``policies`` sees only ``overcommitd.model``: a policy never knows whether it runs on a
hypervisor host or in a replay.
"""

from policies.api import PerGuestPolicy, Policy, PolicyResult

__all__ = ["PerGuestPolicy", "Policy", "PolicyResult"]
