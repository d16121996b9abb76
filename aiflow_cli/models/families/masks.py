"""transformers 5 renamed the KV-cache argument of its mask builders and decoder layers (``past_key_values`` ->
``cache``, with a FutureWarning for the old name): pass it under whichever name the installed version takes."""

from __future__ import annotations

import inspect
from typing import Any

from transformers.masking_utils import create_causal_mask

CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_arg(kv: Any) -> dict[str, Any]:
    """``{name: kv}`` for ``create_causal_mask``, its siblings and the decoder layers' ``forward``."""
    return {CACHE_ARG: kv}
