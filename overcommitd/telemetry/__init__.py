"""Telemetry out of the daemon (MQTT, Prometheus) and commands into it. Nothing here may
block or slow the control loop: publishing is fire-and-forget into bounded buffers."""
