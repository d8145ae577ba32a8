"""Loading a checkpoint's tokenizer (transformers), quietly: the rest of its config may be unknown to transformers."""

from __future__ import annotations


def load_tokenizer(directory: str):
    """The HF tokenizer saved in `directory`, or None when it has none."""
    import os

    if not any(os.path.exists(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    import warnings

    from transformers import AutoTokenizer
    from transformers.utils import logging

    # the checkpoint's config names a model type transformers does not know; only the tokenizer is wanted
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # never the checkpoint's own code (LLaDA's config.json names modeling files in auto_map)
            return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    finally:
        logging.set_verbosity(verbosity)
