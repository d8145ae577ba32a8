"""Evaluation on local benchmark files with the project's own scorer (the OpenCompass plugin is next)."""
