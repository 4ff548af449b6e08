"""Camera ingest against the real embedded broker; bounded buffering when the broker is unreachable."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from ingest.cameras import CameraConfig, Ingest, load_cameras
from inspection_core.broker import free_port
from inspection_core.errors import ConfigError
from inspection_core.kafka import KafkaConfig
from inspection_pb.v1 import frames_pb2
from scorer.demo import make_demo_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    return make_demo_dataset(tmp_path_factory.mktemp("ing"), n_train=3, n_good=0, n_bad=0) / "train" / "good"


def test_two_folder_cameras_publish_every_frame(folder, start_broker) -> None:
    kafka = start_broker(partitions=2)
    cams = [
        CameraConfig(id=c, product="demo", source=str(folder), fps=50, resize=(64, 48), attributes={"line": f"L-{c}"})
        for c in ("a", "b")
    ]
    ing = Ingest(kafka, cams, max_frames=5).start()
    ing.join(60)
    assert sum(ing.stats.published.values()) == 10 and not ing.stats.dropped
    c = kafka.consumer(kafka.topic("frames"), group_id=None)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 10 and time.monotonic() < deadline:
        for msgs in c.poll(timeout_ms=500).values():
            got.extend(msgs)
    c.close()
    frames = [frames_pb2.Frame.FromString(m.value) for m in got]
    assert sorted((f.camera_id, f.sequence) for f in frames) == [(c, s) for c in "ab" for s in range(1, 6)]
    assert all(m.key.decode() == frames_pb2.Frame.FromString(m.value).camera_id for m in got)
    f = frames[0]
    assert f.product_id == "demo" and f.encoding == frames_pb2.ENCODING_JPEG and (f.width, f.height) == (64, 48)
    assert Image.open(io.BytesIO(f.image)).size == (64, 48)
    assert len({x.frame_id for x in frames}) == 10
    assert all(dict(x.attributes) == {"line": f"L-{x.camera_id}"} for x in frames)
    # every record names what it holds, so a consumer in any language can check before it parses
    want = b"application/x-protobuf; messageType=inspection.v1.Frame"
    assert {dict(m.headers)["content-type"] for m in got} == {want}


def test_unreachable_broker_keeps_memory_bounded_and_counts_drops(folder) -> None:
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}")
    cam = CameraConfig(id="c", product="demo", source=str(folder), fps=200)
    ing = Ingest(kafka, [cam], buffer_size=3, max_frames=30).start()
    deadline = time.monotonic() + 20
    while ing.stats.captured["c"] < 30 and time.monotonic() < deadline:
        assert len(ing.buffer) <= 3
        time.sleep(0.01)
    ing.stop()
    st = ing.stats
    assert st.captured["c"] == 30 and st.published["c"] == 0
    assert st.dropped[("c", "buffer_full")] >= 27
    assert st.captured["c"] == st.published["c"] + sum(st.dropped.values())


def test_a_missing_source_is_retried_until_it_appears(tmp_path, folder) -> None:
    src = tmp_path / "later"
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}")
    ing = Ingest(
        kafka, [CameraConfig(id="c", product="demo", source=str(src), fps=100)], max_frames=2, backoff_max_s=0.5
    ).start()
    time.sleep(1.0)
    assert ing.stats.reconnects["c"] >= 1 and not ing.stats.camera_up["c"]
    src.mkdir()
    for p in folder.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    deadline = time.monotonic() + 10
    while ing.stats.captured["c"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    ing.stop()
    assert ing.stats.captured["c"] == 2 and ing.stats.camera_up["c"]


def test_camera_list_validation(tmp_path) -> None:
    p = tmp_path / "cams.toml"
    p.write_text('[[camera]]\nid = "c1"\nproduct = "bottle.top"\nsource = "0"\nfps = 5\nresize = [640, 480]\n')
    (c,) = load_cameras(p)
    assert c.resize == (640, 480) and c.fps == 5
    p.write_text('[[camera]]\nid = "c1"\nproduct = "Bad Name"\nsource = "0"\n')
    with pytest.raises(ConfigError, match="invalid product id"):
        load_cameras(p)
    p.write_text('[[camera]]\nid = "c1"\nproduct = "x"\nsource = "0"\nfps = 0\n')
    with pytest.raises(ConfigError, match="fps must be a number in"):
        load_cameras(p)
    p.write_text('[[camera]]\nid = "c1"\nproduct = "x"\nsource = "0"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match="colour"):
        load_cameras(p)


def test_camera_attributes_from_the_list_the_flag_and_every_camera(tmp_path) -> None:
    from ingest.cameras import parse_attribute, parse_camera, with_attributes

    p = tmp_path / "cams.toml"
    p.write_text('[[camera]]\nid = "c1"\nproduct = "x"\nsource = "0"\nattributes = { line = "L3", station = "7" }\n')
    (c,) = load_cameras(p)
    assert c.attributes == {"line": "L3", "station": "7"}
    c2 = parse_camera("c2=x@0,fps=2,attr.line=L4,attr.shift=night")
    assert c2.attributes == {"line": "L4", "shift": "night"}
    both = with_attributes([c, c2], dict([parse_attribute("plant=P1"), parse_attribute("line=default")]))
    assert both[0].attributes == {"plant": "P1", "line": "L3", "station": "7"}  # the camera's own value wins
    assert both[1].attributes["plant"] == "P1" and both[1].attributes["line"] == "L4"
    for bad, match in (
        ("attributes = { line = 3 }", "attribute line must be a string"),
        ('attributes = { "bad key" = "v" }', "attribute name 'bad key'"),
        ('attributes = "line=L1"', "attributes must be a table"),
        ('attributes = { line = "' + "v" * 300 + '" }', "at most 256"),
    ):
        p.write_text(f'[[camera]]\nid = "c1"\nproduct = "x"\nsource = "0"\n{bad}\n')
        with pytest.raises(ConfigError, match=match):
            load_cameras(p)
    with pytest.raises(ConfigError, match="--attribute expects KEY=VALUE"):
        parse_attribute("line")
    with pytest.raises(ConfigError, match="loop=.maybe. is not a boolean"):
        parse_camera("c3=x@0,loop=maybe")
