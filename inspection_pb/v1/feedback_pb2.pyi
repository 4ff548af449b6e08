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

class Label(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_UNSPECIFIED: _ClassVar[Label]
    LABEL_GOOD: _ClassVar[Label]
    LABEL_DEFECT: _ClassVar[Label]
    LABEL_UNSURE: _ClassVar[Label]
LABEL_UNSPECIFIED: Label
LABEL_GOOD: Label
LABEL_DEFECT: Label
LABEL_UNSURE: Label

class Feedback(_message.Message):
    __slots__ = ("frame_id", "product_id", "label", "regions", "who", "time", "head", "frame_ref")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    FRAME_REF_FIELD_NUMBER: _ClassVar[int]
    frame_id: str
    product_id: str
    label: Label
    regions: _containers.RepeatedCompositeFieldContainer[_common_pb2.Region]
    who: str
    time: _timestamp_pb2.Timestamp
    head: _common_pb2.HeadRef
    frame_ref: _common_pb2.FrameRef
    def __init__(self, frame_id: _Optional[str] = ..., product_id: _Optional[str] = ..., label: _Optional[_Union[Label, str]] = ..., regions: _Optional[_Iterable[_Union[_common_pb2.Region, _Mapping]]] = ..., who: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., head: _Optional[_Union[_common_pb2.HeadRef, _Mapping]] = ..., frame_ref: _Optional[_Union[_common_pb2.FrameRef, _Mapping]] = ...) -> None: ...
