"""Fault-injection, soak and fuzz tests (`tox -e faults`, `pytest -m faults`); see docs/RELIABILITY.md."""
