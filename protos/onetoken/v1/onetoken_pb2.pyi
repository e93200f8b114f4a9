from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeImageRequest(_message.Message):
    __slots__ = ("image", "source_uri")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    source_uri: str
    def __init__(self, image: _Optional[bytes] = ..., source_uri: _Optional[str] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("image_id", "cached", "latent_dim")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    cached: bool
    latent_dim: int
    def __init__(self, image_id: _Optional[str] = ..., cached: _Optional[bool] = ..., latent_dim: _Optional[int] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("image_id", "image_bytes", "question", "options", "images")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image_bytes: bytes
    question: str
    options: GenerationOptions
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    def __init__(self, image_id: _Optional[str] = ..., image_bytes: _Optional[bytes] = ..., question: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("image_id", "image_bytes")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image_bytes: bytes
    def __init__(self, image_id: _Optional[str] = ..., image_bytes: _Optional[bytes] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "encode_ms", "decode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    encode_ms: float
    decode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("image_id", "image_ids", "answer", "finish_reason", "usage", "timings", "token_ids")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    answer: str
    finish_reason: str
    usage: Usage
    timings: Timings
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, image_id: _Optional[str] = ..., image_ids: _Optional[_Iterable[str]] = ..., answer: _Optional[str] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class AskStreamResponse(_message.Message):
    __slots__ = ("text", "token_id", "finish_reason", "usage", "timings", "image_id", "image_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    finish_reason: str
    usage: Usage
    timings: Timings
    image_id: str
    image_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., image_id: _Optional[str] = ..., image_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Latent(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("image_id", "image_bytes", "latent", "k")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    image_bytes: bytes
    latent: Latent
    k: int
    def __init__(self, image_id: _Optional[str] = ..., image_bytes: _Optional[bytes] = ..., latent: _Optional[_Union[Latent, _Mapping]] = ..., k: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("image_id", "score", "source_uri")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    score: float
    source_uri: str
    def __init__(self, image_id: _Optional[str] = ..., score: _Optional[float] = ..., source_uri: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class AskSearchRequest(_message.Message):
    __slots__ = ("search", "question", "options")
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    search: SearchRequest
    question: str
    options: GenerationOptions
    def __init__(self, search: _Optional[_Union[SearchRequest, _Mapping]] = ..., question: _Optional[str] = ..., options: _Optional[_Union[GenerationOptions, _Mapping]] = ...) -> None: ...

class AskSearchResponse(_message.Message):
    __slots__ = ("answer", "hits")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    answer: AskResponse
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    def __init__(self, answer: _Optional[_Union[AskResponse, _Mapping]] = ..., hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("image_id", "model_fingerprint", "source_uri", "created_at", "voco_position", "n_voco", "latent_dim", "kv_bytes", "indexed")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    VOCO_POSITION_FIELD_NUMBER: _ClassVar[int]
    N_VOCO_FIELD_NUMBER: _ClassVar[int]
    LATENT_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEXED_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    model_fingerprint: str
    source_uri: str
    created_at: float
    voco_position: int
    n_voco: int
    latent_dim: int
    kv_bytes: int
    indexed: bool
    def __init__(self, image_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., source_uri: _Optional[str] = ..., created_at: _Optional[float] = ..., voco_position: _Optional[int] = ..., n_voco: _Optional[int] = ..., latent_dim: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., indexed: _Optional[bool] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("image_id",)
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    def __init__(self, image_id: _Optional[str] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
