"""Defaults that commands and configs need without loading the model stack (no torch, no transformers):
the CLI's client commands start in a fraction of a second because they import only modules like this."""

from __future__ import annotations

from pathlib import Path

# The trained tiny hybrid model that ships in the repository: the default model of every command.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "tiny"

# The largest image decoded by default: 64,000,000 pixels (8000 x 8000, or a 64 MP camera photo), far
# above the 336 px a VLM sees and far below what exhausts a worker's memory (192 MB decoded as RGB).
DEFAULT_MAX_PIXELS = 64_000_000
