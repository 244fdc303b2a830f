"""The command-line tools' logic; `tools/*.py` parse nothing themselves and call `main`."""
