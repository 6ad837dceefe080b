"""Market data in: the simulator (simulator.py) and recorded-data replay (replay.py)."""
