"""No network at run time: models and datasets named by hub id load from the local cache only."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def hub_offline():
    """Offline mode for huggingface_hub (and so transformers) and `datasets` inside the block.

    Both read HF_HUB_OFFLINE once, at import, so setting the environment variable later does
    nothing; this sets their module flags and restores them afterwards."""
    import huggingface_hub.constants as hub

    saved = {"hub": hub.HF_HUB_OFFLINE}
    hub.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        saved["datasets"] = datasets_config.HF_HUB_OFFLINE
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved["hub"]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved["datasets"]
