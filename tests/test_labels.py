import pytest

from stages.labels import EMOTIONS, parse_name, resolve_classes


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
