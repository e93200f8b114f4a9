"""How stored key/value state is kept (torch-free, so configs and the CLI can name the choices)."""

from __future__ import annotations

from typing import Literal, get_args

KvDtype = Literal["fp32", "fp16", "bf16", "int8"]
KV_DTYPES: tuple[str, ...] = get_args(KvDtype)
