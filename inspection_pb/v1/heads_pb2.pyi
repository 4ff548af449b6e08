import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from inspection_pb.v1 import common_pb2 as _common_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HeadAnnouncement(_message.Message):
    __slots__ = ("head", "backbone", "weights_sha256", "calibrator_address", "image_threshold", "pixel_threshold", "activated_time", "active", "commissioning")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    CALIBRATOR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PIXEL_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    COMMISSIONING_FIELD_NUMBER: _ClassVar[int]
    head: _common_pb2.HeadRef
    backbone: str
    weights_sha256: str
    calibrator_address: str
    image_threshold: float
    pixel_threshold: float
    activated_time: _timestamp_pb2.Timestamp
    active: bool
    commissioning: bool
    def __init__(self, head: _Optional[_Union[_common_pb2.HeadRef, _Mapping]] = ..., backbone: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., calibrator_address: _Optional[str] = ..., image_threshold: _Optional[float] = ..., pixel_threshold: _Optional[float] = ..., activated_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., commissioning: _Optional[bool] = ...) -> None: ...
