import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from inspection_pb.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_NO_HEAD: _ClassVar[Status]
    STATUS_BAD_FRAME: _ClassVar[Status]
    STATUS_STALE: _ClassVar[Status]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_OK: _ClassVar[Verdict]
    VERDICT_DEFECT: _ClassVar[Verdict]
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_NO_HEAD: Status
STATUS_BAD_FRAME: Status
STATUS_STALE: Status
VERDICT_UNSPECIFIED: Verdict
VERDICT_OK: Verdict
VERDICT_DEFECT: Verdict

class InspectionResult(_message.Message):
    __slots__ = ("frame_id", "camera_id", "product_id", "sequence", "capture_time", "result_time", "status", "reason", "head", "image_score", "normalized_score", "image_threshold", "verdict", "regions", "heatmap_png", "timings", "worker_id", "width", "height", "attributes", "provisional", "frame_ref")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_FIELD_NUMBER: _ClassVar[int]
    FRAME_REF_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    camera_id: str
    product_id: str
    sequence: int
    capture_time: _timestamp_pb2.Timestamp
    result_time: _timestamp_pb2.Timestamp
    status: Status
    reason: str
    head: _common_pb2.HeadRef
    image_score: float
    normalized_score: float
    image_threshold: float
    verdict: Verdict
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Region]
    heatmap_png: bytes
    timings: _common_pb2.StageTimings
    worker_id: str
    width: int
    height: int
    attributes: _containers.ScalarMap[str, str]
    provisional: bool
    frame_ref: _common_pb2.FrameRef
    def __init__(self, frame_id: _Optional[str] = ..., camera_id: _Optional[str] = ..., product_id: _Optional[str] = ..., sequence: _Optional[int] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status: _Optional[_Union[Status, str]] = ..., reason: _Optional[str] = ..., head: _Optional[_Union[_common_pb2.HeadRef, _Mapping]] = ..., image_score: _Optional[float] = ..., normalized_score: _Optional[float] = ..., image_threshold: _Optional[float] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Region, _Mapping]]] = ..., heatmap_png: _Optional[bytes] = ..., timings: _Optional[_Union[_common_pb2.StageTimings, _Mapping]] = ..., worker_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ..., provisional: _Optional[bool] = ..., frame_ref: _Optional[_Union[_common_pb2.FrameRef, _Mapping]] = ...) -> None: ...

class DefectEvent(_message.Message):
    __slots__ = ("event_id", "frame_id", "camera_id", "product_id", "capture_time", "head", "image_score", "normalized_score", "regions", "evidence", "result_time", "width", "height", "attributes", "worker_id", "image_threshold", "provisional", "frame_ref")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAMERA_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIME_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    RESULT_TIME_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_FIELD_NUMBER: _ClassVar[int]
    FRAME_REF_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    frame_id: str
    camera_id: str
    product_id: str
    capture_time: _timestamp_pb2.Timestamp
    head: _common_pb2.HeadRef
    image_score: float
    normalized_score: float
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Region]
    evidence: _common_pb2.Evidence
    result_time: _timestamp_pb2.Timestamp
    width: int
    height: int
    attributes: _containers.ScalarMap[str, str]
    worker_id: str
    image_threshold: float
    provisional: bool
    frame_ref: _common_pb2.FrameRef
    def __init__(self, event_id: _Optional[str] = ..., frame_id: _Optional[str] = ..., camera_id: _Optional[str] = ..., product_id: _Optional[str] = ..., capture_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head: _Optional[_Union[_common_pb2.HeadRef, _Mapping]] = ..., image_score: _Optional[float] = ..., normalized_score: _Optional[float] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Region, _Mapping]]] = ..., evidence: _Optional[_Union[_common_pb2.Evidence, _Mapping]] = ..., result_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., attributes: _Optional[_Mapping[str, str]] = ..., worker_id: _Optional[str] = ..., image_threshold: _Optional[float] = ..., provisional: _Optional[bool] = ..., frame_ref: _Optional[_Union[_common_pb2.FrameRef, _Mapping]] = ...) -> None: ...
