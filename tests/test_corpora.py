import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import write_tone
from ser.corpora import EMOTIONS, SCHEMA, collect, parse_name, resolve_classes, write_parquet


def test_parse_valid_name_decodes_every_field():
    row = parse_name("Actor_12/03-01-05-02-01-02-12.wav")
    assert row == {
        "modality": "audio-only", "vocal_channel": "speech", "emotion": "angry",
        "intensity": "strong", "statement": 1, "repetition": 2, "actor": 12, "sex": "female",
    }


def test_odd_actor_is_male():
    assert parse_name("03-01-08-01-02-01-07.wav")["sex"] == "male"
    assert parse_name("03-01-08-01-02-01-07.wav")["emotion"] == "surprised"


@pytest.mark.parametrize("name, fragment", [
    ("hello.wav", "not a RAVDESS name"),
    ("03-01-09-01-01-01-01.wav", "invalid emotion"),
    ("03-01-05-03-01-01-01.wav", "invalid intensity"),
    ("03-01-05-01-01-01-25.wav", "invalid actor"),
    ("03-01-01-02-01-01-01.wav", "neutral has no strong"),
    ("03-01-05-01-01-01.wav", "not a RAVDESS name"),
])
def test_parse_rejects_bad_names_with_reason(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_name(name)


def test_resolve_classes_keeps_schema_order():
    assert resolve_classes([]) == EMOTIONS
    assert resolve_classes(["sad", "neutral"]) == ["neutral", "sad"]
    with pytest.raises(ValueError, match="unknown"):
        resolve_classes(["bored"])


def test_named_class_sets():
    assert resolve_classes("all") == EMOTIONS
    assert resolve_classes("six") == ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
    with pytest.raises(ValueError, match="unknown class set 'seven'"):
        resolve_classes("seven")


def _tree(root):
    for actor in (1, 2, 3):
        for emotion in (1, 5):
            write_tone(root / f"Actor_{actor:02d}" / f"03-01-{emotion:02d}-01-01-01-{actor:02d}.wav",
                       seconds=0.3, sr=48000, channels=2 if actor == 3 else 1)
    (root / "Actor_01" / "notes.txt").write_text("hi")
    (root / "Actor_01" / "recording.wav").write_bytes(b"x")
    (root / "Actor_02" / "03-01-02-01-01-01-02.wav").write_bytes(b"not audio at all")


def test_collect_decodes_names_reads_headers_and_reports_rejects(tmp_path):
    _tree(tmp_path)
    clips, rejects = collect(tmp_path, test_actors=[3])
    assert len(clips) == 6
    assert clips["path"].tolist() == sorted(clips["path"])
    row = clips[clips["actor"] == 3].iloc[0]
    assert (row["channels"], row["sample_rate"], row["sex"], row["split"]) == (2, 48000, "male", "test")
    assert row["duration_s"] == pytest.approx(0.3, abs=1e-3)
    assert dict(clips.groupby("split")["actor"].unique().apply(sorted)) == {"test": [3], "train": [1, 2]}
    reasons = dict(zip(rejects["path"].map(lambda p: p.split("/")[-1]), rejects["reason"]))
    assert set(reasons) == {"notes.txt", "recording.wav", "03-01-02-01-01-01-02.wav"}
    assert "not a RAVDESS name" in reasons["recording.wav"]
    assert "not readable audio" in reasons["03-01-02-01-01-01-02.wav"]


def test_parquet_has_the_declared_schema(tmp_path):
    _tree(tmp_path / "raw")
    clips, _ = collect(tmp_path / "raw", [3])
    write_parquet(clips, tmp_path / "m.parquet")
    assert pq.read_schema(tmp_path / "m.parquet").remove_metadata() == SCHEMA
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m.parquet"), clips, check_dtype=False)


def test_the_same_clip_under_two_top_folders_is_one_row_and_a_reject(tmp_path):
    _tree(tmp_path / "Audio")
    copy = tmp_path / "backup" / "Actor_01" / "03-01-05-01-01-01-01.wav"
    write_tone(copy, seconds=0.3)
    clips, rejects = collect(tmp_path, test_actors=[3])
    assert len(clips) == 6 and clips["path"].map(lambda p: p.split("/")[-1]).is_unique
    reason = rejects.set_index("path").loc[str(copy), "reason"]
    assert reason.startswith("duplicate of ") and "Audio/Actor_01/03-01-05-01-01-01-01.wav" in reason


def test_the_output_marker_of_an_extracted_folder_is_not_a_reject(tmp_path):
    from ser.util import OUTPUT_MARKER

    _tree(tmp_path)
    (tmp_path / OUTPUT_MARKER).write_text("x")
    _, rejects = collect(tmp_path, test_actors=[3])
    assert OUTPUT_MARKER not in "".join(rejects["path"])
