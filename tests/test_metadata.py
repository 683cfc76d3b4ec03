import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import write_tone
from stages.metadata import SCHEMA, assign_split, collect, write_parquet
from stages.util import UserError


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
    clips, rejects = collect(tmp_path, val_actors=[2], test_actors=[3])
    assert len(clips) == 6
    assert clips["path"].tolist() == sorted(clips["path"])
    row = clips[clips["actor"] == 3].iloc[0]
    assert (row["channels"], row["sample_rate"], row["sex"], row["split"]) == (2, 48000, "male", "test")
    assert row["duration_s"] == pytest.approx(0.3, abs=1e-3)
    assert dict(clips.groupby("split")["actor"].unique().apply(list)) == {"test": [3], "train": [1], "val": [2]}
    reasons = dict(zip(rejects["path"].map(lambda p: p.split("/")[-1]), rejects["reason"]))
    assert set(reasons) == {"notes.txt", "recording.wav", "03-01-02-01-01-01-02.wav"}
    assert "not a RAVDESS name" in reasons["recording.wav"]
    assert "not readable audio" in reasons["03-01-02-01-01-01-02.wav"]


def test_parquet_has_the_declared_schema(tmp_path):
    _tree(tmp_path / "raw")
    clips, _ = collect(tmp_path / "raw", [2], [3])
    write_parquet(clips, tmp_path / "m.parquet")
    assert pq.read_schema(tmp_path / "m.parquet").remove_metadata() == SCHEMA
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "m.parquet"), clips, check_dtype=False)


def test_split_is_by_actor_and_disjoint():
    assert [assign_split(a, [2], [3, 4]) for a in (1, 2, 3, 4)] == ["train", "val", "test", "test"]
    with pytest.raises(UserError, match="actors \\[3\\] are in both"):
        collect(__import__("pathlib").Path("."), val_actors=[3], test_actors=[3])


def test_the_same_clip_under_two_top_folders_is_one_row_and_a_reject(tmp_path):
    _tree(tmp_path / "Audio")
    copy = tmp_path / "backup" / "Actor_01" / "03-01-05-01-01-01-01.wav"
    write_tone(copy, seconds=0.3)
    clips, rejects = collect(tmp_path, val_actors=[2], test_actors=[3])
    assert len(clips) == 6 and clips["path"].map(lambda p: p.split("/")[-1]).is_unique
    reason = rejects.set_index("path").loc[str(copy), "reason"]
    assert reason.startswith("duplicate of ") and "Audio/Actor_01/03-01-05-01-01-01-01.wav" in reason


def test_the_output_marker_of_an_extracted_folder_is_not_a_reject(tmp_path):
    from stages.util import OUTPUT_MARKER

    _tree(tmp_path)
    (tmp_path / OUTPUT_MARKER).write_text("x")
    _, rejects = collect(tmp_path, val_actors=[2], test_actors=[3])
    assert OUTPUT_MARKER not in "".join(rejects["path"])
