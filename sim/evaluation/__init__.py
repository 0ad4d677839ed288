"""Evaluation: replays through the daemon's own step, the scorecard, side by side, reports,
tuning, safe-density planning, sweeps over Dask and the scripted scenarios. Imports
``sim.memory`` and ``sim.virtio``; nothing in the model imports it."""
