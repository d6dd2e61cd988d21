"""Chaos scenarios for listenerd: one module per scenario, shared plumbing in rig.py (see README there)."""
