import collections
from pathlib import Path, PurePosixPath

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, write_tone
from ser.corpora import (EMOTIONS, SCHEMA, collect, collect_corpus, label_map, parse_ased, parse_crema_d, parse_emodb,
                         parse_folders,
                         parse_name, parse_tess, resolve_classes, write_parquet)
from ser.util import UserError


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


# ---- other corpora, the emotion vocabulary, manifests ------------------------------------

SHARED = ROOT.parent / "shared" / "data"


def _real_names(archive: Path, suffix: str) -> list[PurePosixPath]:
    import zipfile

    if not archive.is_file():
        pytest.skip(f"{archive} not found")
    return [PurePosixPath(n) for n in zipfile.ZipFile(archive).namelist() if n.endswith(suffix)]


def test_every_real_tess_name_parses_with_its_speaker_from_the_folder():
    names = _real_names(SHARED / "tess" / "TESS_flac.zip", ".flac")
    parsed = [parse_tess(PurePosixPath(*n.parts[1:])) for n in names]  # relative to TESS/
    assert len(parsed) == 2798 and {p["speaker"] for p in parsed} == {"OAF", "YAF"}
    assert collections.Counter(p["label"] for p in parsed) == {"angry": 399, "disgust": 400, "fear": 400,
                                                               "happy": 400, "neutral": 400, "ps": 400, "sad": 399}
    odd = parse_tess(PurePosixPath("OAF_neutral/OA_bite_neutral.flac"))  # the original's misspelt speaker
    assert odd["speaker"] == "OAF" and odd["label"] == "neutral"
    assert {label_map("tess")[p["label"]] for p in parsed} == {"angry", "disgust", "fearful", "happy", "neutral",
                                                               "surprised", "sad"}


def test_every_real_emodb_name_parses():
    names = _real_names(SHARED / "emodb" / "EmoDB_2s_flac.zip", ".flac")
    parsed = [parse_emodb(n) for n in names]
    assert len(parsed) == 535 and len({p["speaker"] for p in parsed}) == 10
    assert collections.Counter(p["label"] for p in parsed) == {"anger": 127, "boredom": 81, "disgust": 46, "fear": 69,
                                                               "happiness": 71, "sadness": 62, "neutral": 79}
    assert parse_emodb(PurePosixPath("03a01Fa.wav"))["sex"] == "male" and parse_emodb(
        PurePosixPath("08a01Fa.wav"))["sex"] == "female"
    assert label_map("emodb")["boredom"] is None  # no such class: left out, with a reject row


@pytest.mark.parametrize("name, speaker, label", [("1001_DFA_ANG_XX.wav", "1001", "ANG"),
                                                   ("1091_TSI_NEU_LO.wav", "1091", "NEU"),
                                                   ("1045_IEO_HAP_HI.flac", "1045", "HAP")])
def test_crema_d_names_follow_the_official_convention(name, speaker, label):
    assert parse_crema_d(PurePosixPath(name)) == {"speaker": speaker, "label": label, "language": "en"}


@pytest.mark.parametrize("name, expected", [
    ("02Fearful/f2-06-02-02-63.opus", {"speaker": "63", "label": "f", "sex": "male", "language": "am"}),
    ("ASED_v1/01Neutral/n1-01-01-01-01.wav", {"speaker": "01", "label": "n", "sex": "female", "language": "am"}),
    ("04Sad/S4-07-02-02-40.opus", {"speaker": "40", "label": "s", "sex": "male", "language": "am"}),  # one upper-case
])
def test_ased_names_follow_the_authors_layout(name, expected):
    assert parse_ased(PurePosixPath(name)) == expected


@pytest.mark.parametrize("name", ["03Happy/f2-06-02-02-63.opus", "02Fearful/f3-06-02-02-63.opus",
                                  "02Fearful/f2-06-02-02-66.opus", "02Fear/f2-06-02-02-63.opus",
                                  "02Fearful/f2-06-03-02-63.opus", "02Fearful/f2-06-02-03-63.opus", "f2-06-02-02-63.opus"])
def test_ased_names_out_of_its_layout_are_refused(name):
    with pytest.raises(ValueError, match="ASED"):
        parse_ased(PurePosixPath(name))


def test_an_ased_folder_is_collected_by_speaker_with_its_five_emotions(tmp_path):
    root = tmp_path / "ased" / "ASED_v1"
    for folder, letter in (("01Neutral", "n1"), ("02Fearful", "f2"), ("03Happy", "h3"), ("04Sad", "s4"), ("05Angry", "a5")):
        for speaker, sex in (("01", "01"), ("02", "02"), ("03", "02")):
            write_tone(root / folder / f"{letter}-01-01-{sex}-{speaker}.wav", seconds=0.5)
    (root / "source_sha256.tsv").write_text("name\tsha256\n")
    clips, rejects = collect_corpus("ased", "ased", tmp_path / "ased", test_speakers=["01"], calibration_speakers=[2])
    assert len(clips) == 15 and set(clips["emotion"]) == {"neutral", "fearful", "happy", "sad", "angry"}
    by_speaker = clips.groupby("speaker")["split"].first().to_dict()
    assert by_speaker == {"ased:01": "test", "ased:02": "calibration", "ased:03": "train"}
    assert set(clips.loc[clips["speaker"] == "ased:01", "sex"]) == {"female"}
    assert rejects["reason"].tolist() == ["not an audio file extension"]


@pytest.mark.parametrize("parse, name", [(parse_crema_d, "1000_DFA_ANG_XX.wav"), (parse_crema_d, "1001_XYZ_ANG_XX.wav"),
                                         (parse_crema_d, "1001_DFA_BOR_XX.wav"), (parse_crema_d, "1001_DFA_ANG.wav"),
                                         (parse_emodb, "03a01Xa.wav"), (parse_emodb, "04a01Fa.wav"),
                                         (parse_tess, "MAF_angry/MAF_back_angry.flac"),
                                         (parse_tess, "OAF_angry/OAF_back_sad.flac"),
                                         (parse_folders, "x.wav")])
def test_names_a_kind_does_not_know_are_refused_with_the_reason(parse, name):
    with pytest.raises(ValueError, match="not a|disagree|folder"):
        parse(PurePosixPath(name))


def test_labels_map_onto_the_classes_with_overrides():
    assert label_map("ravdess", {"calm": "neutral"})["calm"] == "neutral"
    assert label_map("tess")["ps"] == "surprised"
    with pytest.raises(UserError, match="not among the classes"):
        label_map("tess", {"ps": "amazed"})
    with pytest.raises(UserError, match="unknown corpus kind 'iemocap'"):
        label_map("iemocap")


def test_a_corpus_scan_lists_what_it_leaves_out_and_why(tmp_path):
    root = tmp_path / "emodb" / "wav"
    for name in ("03a01Fa", "03a02Wb", "08a01La", "10b09Ta"):
        write_tone(root / f"{name}.flac", seconds=0.5)
    write_tone(root / "zz_not_emodb.flac", seconds=0.5)
    clips, rejects = collect_corpus("emodb", "emodb", tmp_path / "emodb", test_speakers=["10"])
    assert clips["emotion"].tolist() == ["happy", "angry", "sad"]
    assert clips["speaker"].tolist() == ["emodb:03", "emodb:03", "emodb:10"]
    assert clips["split"].tolist() == ["train", "train", "test"] and set(clips["corpus"]) == {"emodb"}
    assert clips["language"].unique().tolist() == ["de"] and clips["actor"].isna().all()
    reasons = dict(zip(rejects["path"].map(lambda p: Path(p).name), rejects["reason"]))
    assert reasons == {"08a01La.flac": "label 'boredom' maps to no class (left out by corpus emodb's labels)",
                       "zz_not_emodb.flac": "not an EmoDB name (want SSTTTEV, e.g. 03a01Fa): zz_not_emodb.flac"}
    write_parquet(clips, tmp_path / "m.parquet")  # nullable RAVDESS columns fit the schema
    assert pq.read_schema(tmp_path / "m.parquet").remove_metadata() == SCHEMA


def test_calibration_speakers_get_their_own_split_and_never_overlap_the_test(tmp_path):
    root = tmp_path / "emodb" / "wav"
    for name in ("03a01Fa", "09a02Wb", "10b09Wa"):
        write_tone(root / f"{name}.flac", seconds=0.5)
    clips, _ = collect_corpus("emodb", "emodb", tmp_path / "emodb", test_speakers=["10"], calibration_speakers=["09"])
    assert clips["split"].tolist() == ["train", "calibration", "test"]
    with pytest.raises(UserError, match=r"speaker\(s\) \['10'\] are in test_speakers and calibration_speakers"):
        collect_corpus("emodb", "emodb", tmp_path / "emodb", test_speakers=["10"], calibration_speakers=["10"])
    manifest = _manifest(tmp_path, ["a.wav,happy,ann", "b.wav,sad,bob", "c.wav,sad,cy,test"],
                         header="path,emotion,speaker,split")
    mine, _ = collect_corpus("mine", "manifest", manifest, [], calibration_speakers=["bob"])
    assert mine["split"].tolist() == ["train", "calibration", "test"]


def test_folders_per_speaker_and_emotion(tmp_path):
    for speaker, emotion in (("ann", "happy"), ("ann", "sad"), ("bob", "happy"), ("bob", "bored")):
        write_tone(tmp_path / "mine" / speaker / emotion / "take1.wav", seconds=0.5)
    # a clip's name is the clip for file-name corpora, not here: every take1.wav is its own clip
    clips, rejects = collect_corpus("mine", "folders", tmp_path / "mine", test_speakers=["bob"],
                                    labels={"bored": None})
    assert list(zip(clips["speaker"], clips["emotion"], clips["split"])) == [
        ("mine:ann", "happy", "train"), ("mine:ann", "sad", "train"), ("mine:bob", "happy", "test")]
    assert rejects["path"].tolist() == [str(tmp_path / "mine" / "bob" / "bored" / "take1.wav")]
    write_tone(tmp_path / "flat" / "angry" / "x.wav", seconds=0.5)  # <emotion>/<file>: one speaker
    flat, _ = collect_corpus("flat", "folders", tmp_path / "flat", test_speakers=[])
    assert flat["speaker"].tolist() == ["flat:all"] and flat["emotion"].tolist() == ["angry"]


def _manifest(tmp_path, rows, header="path,emotion,speaker"):
    for row in rows:
        if not row.startswith("missing"):
            write_tone(tmp_path / row.split(",")[0], seconds=0.5)
    path = tmp_path / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_a_manifest_of_your_own_recordings(tmp_path):
    manifest = _manifest(tmp_path, ["a/1.wav,happy,ann", "a/2.wav,sad,ann", "b/1.wav,happy,bob", "b/2.wav,bored,bob"])
    clips, rejects = collect_corpus("mine", "manifest", manifest, ["bob"], labels={"bored": None})
    assert clips["speaker"].tolist() == ["mine:ann", "mine:ann", "mine:bob"]
    assert clips["split"].tolist() == ["train", "train", "test"]
    assert clips["path"].tolist() == [str(tmp_path / p) for p in ("a/1.wav", "a/2.wav", "b/1.wav")]
    assert rejects["reason"].tolist() == ["label 'bored' maps to no class (left out by corpus mine's labels)"]


@pytest.mark.parametrize("rows, header, message", [
    (["a.wav,happy,ann"], "path,emotion", "missing column\\(s\\) speaker"),
    (["a.wav,happy,ann", "b.wav,elated,ann"], None, "row 2 \\(path 'b.wav'\\): unknown emotion 'elated'"),
    (["a.wav,happy,ann", "missing.wav,sad,ann"], None, "row 2 \\(path 'missing.wav'\\): no such file"),
    (["a.wav,happy,ann", "a.wav,sad,ann"], None, "row 2 \\(path 'a.wav'\\): the same file as row 1"),
    (["a.wav,happy,ann,train", "b.wav,sad,ann,test"], "path,emotion,speaker,split",
     "row 2 \\(path 'b.wav'\\): speaker 'ann' is in split test here and in train in row 1"),
    (["a.wav,happy,,train"], "path,emotion,speaker,split", "row 1 \\(path 'a.wav'\\): no speaker"),
    (["a.wav,happy,ann,val"], "path,emotion,speaker,split", "split 'val' is not one of train, calibration, test"),
])
def test_a_bad_manifest_fails_with_one_message_naming_the_row(tmp_path, rows, header, message):
    manifest = _manifest(tmp_path, rows, header or "path,emotion,speaker")
    with pytest.raises(UserError, match=message):
        collect_corpus("mine", "manifest", manifest, [])


@pytest.mark.parametrize("kind", ["parent", "absolute", "folder_link"])
def test_a_manifest_path_that_leaves_the_corpus_folder_is_refused(tmp_path, kind):
    corpus = tmp_path / "raw" / "mine"
    write_tone(corpus / "a.wav", seconds=0.5)
    outside = write_tone(tmp_path / "elsewhere" / "b.wav", seconds=0.5)  # a file DVC does not track
    (corpus / "linked").symlink_to(outside.parent, target_is_directory=True)
    path = {"parent": "../../elsewhere/b.wav", "absolute": str(outside), "folder_link": "linked/b.wav"}[kind]
    manifest = corpus / "labels.csv"
    manifest.write_text(f"path,emotion,speaker\na.wav,happy,ann\n{path},sad,bob\n")
    with pytest.raises(UserError, match=f"row 2 \\(path '{path}'\\): the path leads out of the corpus's folder"):
        collect_corpus("mine", "manifest", manifest, [], corpus_root=corpus)


def test_a_manifest_may_reach_up_to_its_corpus_folder_but_not_beyond(tmp_path):
    from ser.corpora import collect_corpora

    raw = tmp_path / "raw"
    write_tone(raw / "mine" / "audio" / "a.wav", seconds=0.5)
    (raw / "mine" / "meta").mkdir()
    (raw / "mine" / "meta" / "labels.csv").write_text("path,emotion,speaker\n../audio/a.wav,happy,ann\n")
    clips, _ = collect_corpora(raw, {"mine": {"kind": "manifest", "manifest": "meta/labels.csv", "test_speakers": []}})
    assert clips["path"].tolist() == [str(raw / "mine" / "meta" / "../audio/a.wav")]


@pytest.mark.parametrize("content, message", [
    ("path,emotion,speaker\ncaf\xe9.wav,happy,ann\n".encode("latin-1"), "not UTF-8 text \\(line 2, byte 24\\)"),
    (b"path,emotion,speaker\n\"a.wav,happy\n", "cannot be read as a table"),
    (b"PAR1 not parquet", "cannot be read as a table"),
])
def test_a_manifest_that_is_not_utf8_or_does_not_parse_is_one_message(tmp_path, content, message):
    manifest = tmp_path / ("labels.parquet" if content.startswith(b"PAR1") else "labels.csv")
    manifest.write_bytes(content)
    with pytest.raises(UserError, match=f"{manifest.name}: {message}"):
        collect_corpus("mine", "manifest", manifest, [])


def test_nulls_in_a_parquet_manifest_are_empty_cells_not_the_text_none(tmp_path):
    import pandas as pd

    write_tone(tmp_path / "a.wav", seconds=0.5)
    write_tone(tmp_path / "b.wav", seconds=0.5)
    pd.DataFrame({"path": ["a.wav", "b.wav"], "emotion": ["happy", "sad"], "speaker": ["ann", None],
                  "sex": [None, "f"]}).to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(UserError, match="row 2 \\(path 'b.wav'\\): no speaker"):
        collect_corpus("mine", "manifest", tmp_path / "labels.parquet", [])
