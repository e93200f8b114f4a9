"""EncoderConfig validation: bad values fail at construction with the allowed values named."""

from __future__ import annotations

import pytest

from encoder_service.config import EncoderConfig


def test_defaults_are_valid() -> None:
    config = EncoderConfig()
    assert config.backend == "ray" and config.kv_dtype == "fp16" and config.num_gpus_per_actor is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backend": "threads"}, "backend must be one of ('ray', 'local')"),
        ({"kv_dtype": "fp8"}, "kv_dtype must be one of"),
        ({"num_actors": -1}, "num_actors must be >= 0"),
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"max_queue": 0}, "max_queue must be >= 1"),
        ({"max_wait_ms": -1.0}, "max_wait_ms >= 0"),
        ({"num_gpus_per_actor": -0.5}, "num_gpus_per_actor must be >= 0"),
    ],
)
def test_bad_values_name_the_allowed_ones(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EncoderConfig(**changes)  # type: ignore[arg-type]
