"""Benchmark evaluation: local benchmark files scored through OpenCompass (compass.py) or the project's own loop."""
