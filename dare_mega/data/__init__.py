"""Prompt/response records, SFT tokenization and packing, synthetic verifiable tasks."""
