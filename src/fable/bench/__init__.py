"""``fable bench``: how every IPC mechanism performs on this machine, and why none always wins.

``topology`` labels CPU pairs (same-core ... other-node) from /sys; ``harness`` runs one
measurement point in two pinned processes and returns a JSON record (DESIGN.md §9).
"""
