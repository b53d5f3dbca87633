"""Domain services that run inside the box's processes (devices, check-in, alerting, ...)."""
