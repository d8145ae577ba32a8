"""Command-line entry points (the scripts in tools/ are thin wrappers around these)."""
