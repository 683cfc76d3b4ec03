import numpy as np
import pytest
import torch

from ser.grouping import GroupStatistics, SpeakerStatistics, speaker_keys, statistics_sample
from ser.models import speaker_statistics
from ser.util import UserError


def test_running_statistics_equal_the_speaker_statistics_of_training():
    torch.manual_seed(0)
    x = torch.full((5, 4, 12), -80.0)  # the floor: padding
    x[:3, :, :7] = torch.randn(3, 4, 7) * 3 - 20
    x[3:, :, 2:] = torch.randn(2, 4, 10) * 6 - 40
    speakers = ["a", "a", "a", "b", "b"]
    running = SpeakerStatistics(4, floor_db=-80.0)
    for i in (0, 3, 1, 4, 2):  # any order, one clip at a time
        running.add(speakers[i], x[i : i + 1].numpy())
    result = running.finish()
    mean, std = speaker_statistics(x, speakers)
    for i, s in enumerate(speakers):
        np.testing.assert_allclose(result[s].bands[0], mean[i].numpy(), atol=1e-4)
        np.testing.assert_allclose(result[s].bands[1], std[i].numpy(), atol=1e-4)
    assert result["a"].functionals is None and result["a"].windows == 3


def test_running_functional_statistics_equal_the_fusions_and_need_a_few_windows_for_a_spread():
    from ser.fusion import group_statistics
    from ser.grouping import MIN_SPREAD_WINDOWS

    rng = np.random.default_rng(1)
    f = rng.normal(40, 5, (MIN_SPREAD_WINDOWS + 3, 6))
    keys = ["big"] * MIN_SPREAD_WINDOWS + ["small"] * 3
    running = SpeakerStatistics(4, floor_db=-80.0)
    for i, key in enumerate(keys):
        running.add(key, rng.normal(-30, 5, (1, 4, 9)), f[i : i + 1])
    result = running.finish()
    mean, std = group_statistics(f, keys)
    np.testing.assert_allclose(result["big"].functionals[0], mean[0])
    np.testing.assert_allclose(result["big"].functionals[1], std[0])
    training = (np.zeros(6), np.full(6, 7.0))  # the average training speaker's
    big_mean, big_std = result["big"].functional_statistics(training)
    np.testing.assert_allclose(big_std, std[0])  # enough windows: the group's own spread
    small_mean, small_std = result["small"].functional_statistics(training)
    np.testing.assert_allclose(small_mean, mean[-1])  # three windows: their mean...
    np.testing.assert_allclose(small_std, 7.0)  # ...but no spread to trust: the training speakers'
    assert GroupStatistics(result["big"].bands).functional_statistics(training) is training  # none gathered


def test_a_group_of_silence_falls_back_to_all_its_frames():
    running = SpeakerStatistics(3, floor_db=-80.0)
    running.add("quiet", np.full((1, 3, 5), -80.0))
    mean, std = running.finish()["quiet"].bands
    assert (mean == -80.0).all() and (std == pytest.approx(1e-3))


def test_speaker_keys(tmp_path):
    paths = [tmp_path / "a" / "1.wav", tmp_path / "b" / "2.wav"]
    assert speaker_keys(paths, "none") is None
    assert speaker_keys(paths, "file") == [str(p) for p in paths]
    assert speaker_keys(paths, "folder") == [str(tmp_path / "a"), str(tmp_path / "b")]
    (tmp_path / "who.parquet").write_bytes(b"")
    import pandas as pd

    pd.DataFrame({"path": [str(paths[0]), "b/2.wav"], "speaker": ["x", "y"]}).to_parquet(tmp_path / "who.parquet")
    assert speaker_keys(paths, str(tmp_path / "who.parquet")) == ["x", "y"]  # absolute, or relative to it
    with pytest.raises(UserError, match="no such manifest"):
        speaker_keys(paths, str(tmp_path / "nobody.csv"))
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00garbage\x00")
    with pytest.raises(UserError, match="bad.csv"):
        speaker_keys(paths, str(tmp_path / "bad.csv"))


def test_a_groups_statistics_come_from_a_seeded_sample_of_at_most_max_files():
    paths = [f"{i:03d}.wav" for i in range(200)]
    keys = ["big"] * 150 + ["small"] * 40 + ["one"] * 10
    keys = [keys[(7 * i) % 200] for i in range(200)]  # groups interleaved
    sample = statistics_sample(paths, keys, max_files=30)
    chosen = [keys[paths.index(p)] for p in sample]
    assert chosen.count("big") == 30 and chosen.count("small") == 30 and chosen.count("one") == 10
    assert sample == sorted(sample)  # in the order of the paths
    assert sample == statistics_sample(paths, keys, max_files=30)  # the same files every run
    assert statistics_sample(paths, keys, max_files=150) == paths


@pytest.mark.parametrize("name, content, message", [
    ("who.csv", "path,speaker\nb\xe9.wav,ann\n".encode("latin-1"), "not UTF-8 text \\(line 2, byte 14\\)"),
    ("who.csv", b"path,speaker\n\"a.wav,ann\n", "cannot be read as a table"),
    ("who.parquet", b"not parquet", "cannot be read as a table"),
])
def test_a_speaker_manifest_that_does_not_read_is_one_message(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=f"--speakers {tmp_path / name}: {message}"):
        speaker_keys([tmp_path / "a.wav"], str(tmp_path / name))


def test_nulls_in_a_parquet_speaker_manifest_are_empty_not_the_speaker_none(tmp_path):
    import pandas as pd

    pd.DataFrame({"path": ["a.wav", "b.wav"], "speaker": ["ann", None]}).to_parquet(tmp_path / "who.parquet")
    with pytest.raises(UserError, match="row 3 \\(b.wav\\): the speaker is empty"):
        speaker_keys([tmp_path / "a.wav", tmp_path / "b.wav"], str(tmp_path / "who.parquet"))
    pd.DataFrame({"path": ["a.wav", None], "speaker": ["ann", "bob"]}).to_parquet(tmp_path / "who.parquet")
    with pytest.raises(UserError, match="row 3: the path is empty"):
        speaker_keys([tmp_path / "a.wav"], str(tmp_path / "who.parquet"))
