import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from inspection_pb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FitHeader(_message.Message):
    __slots__ = ("product_id", "backbone", "shots", "method", "activate", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    backbone: str
    shots: int
    method: str
    activate: bool
    options: _containers.ScalarMap[str, str]
    def __init__(self, product_id: _Optional[str] = ..., backbone: _Optional[str] = ..., shots: _Optional[int] = ..., method: _Optional[str] = ..., activate: _Optional[bool] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "name", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FitHeader
    chunk: ImageChunk
    def __init__(self, header: _Optional[_Union[FitHeader, _Mapping]] = ..., chunk: _Optional[_Union[ImageChunk, _Mapping]] = ...) -> None: ...

class HeadInfo(_message.Message):
    __slots__ = ("head", "backbone", "weights_sha256", "method", "shots", "image_threshold", "pixel_threshold", "active", "created_time", "fit_metrics", "reference_sha256", "requested_method", "selection", "commissioning", "line_status", "candidate_reason")
    class FitMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    HEAD_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PIXEL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    FIT_METRICS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_METHOD_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    COMMISSIONING_FIELD_NUMBER: _ClassVar[int]
    LINE_STATUS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_REASON_FIELD_NUMBER: _ClassVar[int]
    head: _common_pb2.HeadRef
    backbone: str
    weights_sha256: str
    method: str
    shots: int
    image_threshold: float
    pixel_threshold: float
    active: bool
    created_time: _timestamp_pb2.Timestamp
    fit_metrics: _containers.ScalarMap[str, float]
    reference_sha256: _containers.RepeatedScalarFieldContainer[str]
    requested_method: str
    selection: str
    commissioning: bool
    line_status: str
    candidate_reason: str
    def __init__(self, head: _Optional[_Union[_common_pb2.HeadRef, _Mapping]] = ..., backbone: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., method: _Optional[str] = ..., shots: _Optional[int] = ..., image_threshold: _Optional[float] = ..., pixel_threshold: _Optional[float] = ..., active: _Optional[bool] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fit_metrics: _Optional[_Mapping[str, float]] = ..., reference_sha256: _Optional[_Iterable[str]] = ..., requested_method: _Optional[str] = ..., selection: _Optional[str] = ..., commissioning: _Optional[bool] = ..., line_status: _Optional[str] = ..., candidate_reason: _Optional[str] = ...) -> None: ...

class FitProgress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "loss", "result", "detail")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    step: int
    total_steps: int
    loss: float
    result: HeadInfo
    detail: str
    def __init__(self, stage: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., result: _Optional[_Union[HeadInfo, _Mapping]] = ..., detail: _Optional[str] = ...) -> None: ...

class ListHeadsRequest(_message.Message):
    __slots__ = ("product_id",)
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    def __init__(self, product_id: _Optional[str] = ...) -> None: ...

class ListHeadsResponse(_message.Message):
    __slots__ = ("heads",)
    HEADS_FIELD_NUMBER: _ClassVar[int]
    heads: _containers.RepeatedCompositeFieldContainer[HeadInfo]
    def __init__(self, heads: _Optional[_Iterable[_Union[HeadInfo, _Mapping]]] = ...) -> None: ...

class HeadSelector(_message.Message):
    __slots__ = ("product_id", "version")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    version: int
    def __init__(self, product_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data", "sha256", "total_size")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    total_size: int
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class SetThresholdsRequest(_message.Message):
    __slots__ = ("head", "image_threshold", "pixel_threshold", "activate")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PIXEL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    head: HeadSelector
    image_threshold: float
    pixel_threshold: float
    activate: bool
    def __init__(self, head: _Optional[_Union[HeadSelector, _Mapping]] = ..., image_threshold: _Optional[float] = ..., pixel_threshold: _Optional[float] = ..., activate: _Optional[bool] = ...) -> None: ...
