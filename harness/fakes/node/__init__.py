"""The Node preload that redirects a target's hard-coded exchange URLs (see preload.mjs)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

PRELOAD_PATH = Path(__file__).with_name("preload.mjs")
URL_MAP_ENV = "QUANTLAB_CHAOS_URL_MAP"
BINANCE_FUTURES_WS = "wss://fstream.binance.com"


def node_options_with_preload(existing: str = "") -> str:
    """NODE_OPTIONS that load the preload, keeping whatever options were there."""
    path = str(PRELOAD_PATH)
    flag = f'--import="{path}"' if " " in path else f"--import={path}"  # NODE_OPTIONS splits on spaces
    return f"{existing} {flag}".strip() if flag not in existing else existing


def url_map_env(mapping: Mapping[str, str]) -> dict[str, str]:
    """The environment entry that tells the preload where each hard-coded URL prefix goes."""
    return {URL_MAP_ENV: json.dumps(dict(mapping), sort_keys=True)}
