"""The project's sample model packages, built locally with no download (see models/build.py)."""
