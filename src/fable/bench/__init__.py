"""``fable bench``: how every IPC mechanism performs on this machine, and why none always wins.

``links`` connects the two processes of a point (fable's transports; ``peers``: other
libraries); ``harness`` runs one measurement point in two pinned processes and returns a JSON
record (DESIGN.md §9); ``report`` and ``plot`` turn records into tables, figures and report.md;
``scenario`` runs the multi-step scenarios. CPU placements come from ``fable.topology``.
"""
