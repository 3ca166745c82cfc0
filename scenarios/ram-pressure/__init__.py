"""ram-pressure: boot sandboxes until the host says stop, with free page reporting on and off (scenario.py)."""
