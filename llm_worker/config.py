"""The LLM worker's configuration: one frozen dataclass, read from flags and ONETOKEN_* variables only
in `llm_worker.cli`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from cache.factory import StoreConfig
from encoder_service.config import EncoderConfig
from llm_worker.security import TokenTable, is_loopback

DEFAULT_INDEX_DIR = ".onetoken/index"

LogFormat = Literal["plain", "json"]  # how serve writes its log lines: text, or one JSON object each


@dataclass(frozen=True)
class WorkerConfig:
    store: StoreConfig = field(default_factory=StoreConfig)  # the worker's and its encoders' store
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    index_dir: str = DEFAULT_INDEX_DIR
    index_spec: str = "Flat"  # a faiss.index_factory string; "IVF4096,Flat" and the like for scale
    # Search re-ranks k x index_rerank index candidates by exact cosine with their stored latents
    # (cache.search); 0 = off; None = cache.index.DEFAULT_RERANK for lossy specs (PQ, SQ), else 0.
    index_rerank: int | None = None
    max_message_mb: int = 64  # gRPC send/receive limit: image bytes travel in requests
    max_decode_batch: int = 32  # rows decoded together, one forward per step
    max_pending_asks: int = 256  # Asks waiting for a decode slot before RESOURCE_EXHAUSTED
    default_max_new_tokens: int = 32
    # How often the index reads the store's change feed: records other processes (other workers,
    # ingest) store or delete are searchable here within about this long. 0 disables.
    index_follow_s: float = 0.25
    index_save_s: float = 60.0  # how often a changed index is saved (and at shutdown)
    device: str = "auto"  # the decoding model's device: auto = cuda when available
    health_check_s: float = 5.0  # how often health (decoding loop, store) is checked for the health service
    tls_cert: str | None = None  # PEM files: serve TLS with this certificate and key
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS: clients need a certificate this CA signed
    tokens: TokenTable = field(default_factory=lambda: TokenTable(()))  # empty: no authentication
    insecure: bool = False  # allow a non-loopback address without TLS and tokens
    metrics_port: int | None = None  # Prometheus metrics on host:metrics_port; 0 picks a free port; None: off
    log_format: LogFormat = "plain"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_message_mb", "max_decode_batch", "max_pending_asks", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.index_rerank is not None and self.index_rerank < 0:
            raise ValueError(
                f"index_rerank must be >= 0 (0 = off) or None (by spec), got {self.index_rerank}"
            )
        if self.index_follow_s < 0:
            raise ValueError(f"index_follow_s must be >= 0, got {self.index_follow_s}")
        if self.index_save_s <= 0:
            raise ValueError(f"index_save_s must be > 0, got {self.index_save_s}")
        if self.health_check_s <= 0:
            raise ValueError(f"health_check_s must be > 0, got {self.health_check_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        if not is_loopback(self.host) and not (self.tls_cert and self.tokens) and not self.insecure:
            raise ValueError(
                f"refusing to serve on {self.host} without TLS and tokens: anyone who can reach it could "
                "read and delete every record. Give --tls-cert/--tls-key and --tokens-file (or "
                "ONETOKEN_TOKENS), serve on 127.0.0.1, or pass --insecure on a network you trust"
            )
        if self.metrics_port is not None:
            if not 0 <= self.metrics_port <= 65535:
                raise ValueError(f"metrics_port must be in [0, 65535] or None (off), got {self.metrics_port}")
            if self.metrics_port == self.port != 0:
                raise ValueError(f"metrics_port and port are both {self.port}: give the metrics another port")
        if self.log_format not in get_args(LogFormat):
            raise ValueError(f"log_format must be one of {get_args(LogFormat)}, got {self.log_format!r}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
