"""The runtime: executing per-rank plans.

``actors.local.run_plans`` runs every rank's plan in its own thread against the in-process
transport (the local backend). The register-based actors and the Ray worker of DESIGN.md come
next; they replace this executor, not the plans.
"""
