"""ollama-mirror: a pull-through caching mirror for the Ollama model registry."""

from __future__ import annotations

__version__ = "0.1.0"

from .app import create_app  # noqa: E402  (after __version__, which upstream.py reads)
from .config import Settings  # noqa: E402

__all__ = ["Settings", "__version__", "create_app"]
