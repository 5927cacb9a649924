"""The runtime: executing per-rank plans.

- :mod:`actors.runtime`: register-based op actors, how one rank runs its plan.
- :mod:`actors.worker`: the per-device worker that hosts a rank's plans and optimizer state.
- :mod:`actors.backends`: where the workers live — threads of this process (``LocalBackend``)
  or one Ray actor per device (``RayBackend``) — behind one interface.
"""
