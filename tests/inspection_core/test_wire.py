"""Record encodings: protobuf or canonical JSON, named by a content-type header; the shipped descriptor set."""

from __future__ import annotations

import json

import pytest
from google.protobuf import descriptor_pb2

from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig, parse_topic_encoding
from inspection_core.wire import WireError, decode, descriptor_set_path, encode, parse_content_type
from inspection_pb.v1 import frames_pb2, results_pb2


def _event() -> results_pb2.DefectEvent:
    d = results_pb2.DefectEvent(event_id="e1", frame_id="f1", product_id="bottle", width=640, height=480)
    d.attributes["line"] = "L3"
    d.regions.add(x_min=1, y_min=2, x_max=30, y_max=40, area=1000, peak=2.5)
    d.capture_time.FromSeconds(1_700_000_000)
    return d


def test_json_is_the_canonical_mapping_with_every_field_and_a_header_that_names_it() -> None:
    value, headers = encode(_event(), "json")
    assert headers == [("content-type", b"application/json; messageType=inspection.v1.DefectEvent")]
    obj = json.loads(value)
    assert obj["frameId"] == "f1" and obj["width"] == 640 and obj["attributes"] == {"line": "L3"}
    assert obj["captureTime"] == "2023-11-14T22:13:20Z" and obj["regions"][0]["area"] == "1000"  # int64: string
    assert obj["normalizedScore"] == 0  # default-valued fields are present: no proto knowledge needed
    assert decode(value, results_pb2.DefectEvent, headers) == _event()
    pvalue, pheaders = encode(_event())
    assert parse_content_type(pheaders[0][1]) == ("protobuf", "inspection.v1.DefectEvent")
    assert decode(pvalue, results_pb2.DefectEvent, pheaders) == _event() == decode(pvalue, results_pb2.DefectEvent)


def test_a_record_of_another_type_or_encoding_is_refused_with_the_reason() -> None:
    value, headers = encode(_event(), "json")
    with pytest.raises(WireError, match="holds 'inspection.v1.DefectEvent', expected inspection.v1.Frame"):
        decode(value, frames_pb2.Frame, headers)
    with pytest.raises(WireError, match="are not a JSON inspection.v1.DefectEvent"):
        decode(b"{not json", results_pb2.DefectEvent, headers)
    with pytest.raises(WireError, match="neither protobuf nor JSON"):
        decode(value, results_pb2.DefectEvent, [("content-type", b"text/csv")])
    with pytest.raises(WireError, match="are not a protobuf"):
        decode(b"\xff\xff\xff", results_pb2.DefectEvent)


def test_topic_encoding_option() -> None:
    assert parse_topic_encoding("defects=json") == ("defects", "json")
    for bad in ("frames=json", "defects=xml", "defects"):
        with pytest.raises(ConfigError, match="expected TOPIC=ENCODING with TOPIC one of results, defects"):
            parse_topic_encoding(bad)
    k = KafkaConfig(bootstrap_servers="x:1", topic_encodings=(("defects", "json"),))
    assert k.encoding("defects") == "json" and k.encoding("results") == "protobuf"


def test_the_shipped_descriptor_set_has_every_message_and_the_language_options() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes())
    files = {f.name: f for f in fds.file}
    assert "google/protobuf/timestamp.proto" in files  # imports included: usable on its own
    ours = [f for n, f in files.items() if n.startswith("inspection_pb/v1/")]
    assert {f.name.rsplit("/", 1)[1] for f in ours} == {
        "calibrator.proto",
        "common.proto",
        "feedback.proto",
        "frames.proto",
        "heads.proto",
        "results.proto",
    }
    for f in ours:
        assert f.options.go_package.endswith(";inspectionv1")
        assert f.options.java_package == "io.cffinspect.inspection.v1"
        assert f.options.csharp_namespace == "CffInspect.Inspection.V1" and f.options.java_multiple_files
    results = files["inspection_pb/v1/results.proto"]
    event = next(m for m in results.message_type if m.name == "DefectEvent")
    assert {"width", "height", "result_time", "attributes", "evidence"} <= {x.name for x in event.field}
