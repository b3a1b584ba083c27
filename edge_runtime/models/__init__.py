"""Model packages, the on-device model store, and the repository that serves loaded versions."""
