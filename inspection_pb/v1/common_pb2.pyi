from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Region(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max", "area", "peak")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    AREA_FIELD_NUMBER: _ClassVar[int]
    PEAK_FIELD_NUMBER: _ClassVar[int]
    x_min: int
    y_min: int
    x_max: int
    y_max: int
    area: int
    peak: float
    def __init__(self, x_min: _Optional[int] = ..., y_min: _Optional[int] = ..., x_max: _Optional[int] = ..., y_max: _Optional[int] = ..., area: _Optional[int] = ..., peak: _Optional[float] = ...) -> None: ...

class HeadRef(_message.Message):
    __slots__ = ("product_id", "head_id", "version", "sha256")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    HEAD_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    head_id: str
    version: int
    sha256: str
    def __init__(self, product_id: _Optional[str] = ..., head_id: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class FrameRef(_message.Message):
    __slots__ = ("topic", "partition", "offset")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    topic: str
    partition: int
    offset: int
    def __init__(self, topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("queue_wait_s", "decode_s", "inference_s", "publish_s", "batch_size")
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_S_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_wait_s: float
    decode_s: float
    inference_s: float
    publish_s: float
    batch_size: int
    def __init__(self, queue_wait_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., inference_s: _Optional[float] = ..., publish_s: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("image_uri", "overlay_uri")
    IMAGE_URI_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_URI_FIELD_NUMBER: _ClassVar[int]
    image_uri: str
    overlay_uri: str
    def __init__(self, image_uri: _Optional[str] = ..., overlay_uri: _Optional[str] = ...) -> None: ...
