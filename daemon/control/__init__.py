"""The control plane: admin operations, reloads, systemd notifications."""
