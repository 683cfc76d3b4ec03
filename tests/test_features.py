import numpy as np
import pytest

from conftest import write_tone
from ser.audio import LogMel
from ser.features import build, load


def test_build_writes_an_aligned_memmap_and_same_numbers_for_any_n_jobs(tmp_path, feature_params):
    paths = [str(write_tone(tmp_path / f"clip{i}.wav", seconds=0.5 + 0.1 * i, sr=22050, freq=200 + 50 * i))
             for i in range(5)]
    build(paths, feature_params, tmp_path / "f1", n_jobs=1)
    build(paths, feature_params, tmp_path / "f2", n_jobs=2)
    array, index, fp = load(tmp_path / "f1")
    assert isinstance(array, np.memmap)
    assert array.shape == (5, feature_params.n_mels, feature_params.n_frames)
    assert index["path"].tolist() == paths
    assert fp == feature_params
    np.testing.assert_array_equal(array, load(tmp_path / "f2")[0])
    # the stored row is exactly what prediction computes for the same file
    np.testing.assert_array_equal(array[3], LogMel(feature_params).from_file(paths[3]))


def test_a_bad_clip_fails_the_stage_naming_it_and_leaves_no_output(tmp_path, feature_params):
    import pytest

    from ser.util import UserError

    good = str(write_tone(tmp_path / "good.wav"))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.wav"):
        build([good, str(bad)], feature_params, tmp_path / "out", n_jobs=1)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav", "good.wav"]


def test_a_clip_is_computed_once_per_params_and_code_whatever_the_mix(tmp_path, feature_params):
    import dataclasses

    import numpy as np

    from ser.features import ARRAY_NAME, build, cache_key, load_functionals

    paths = [str(write_tone(tmp_path / f"c{i}.wav", freq=200 + 40 * i)) for i in range(4)]
    cache = tmp_path / "cache"
    _, computed = build(paths[:3], feature_params, tmp_path / "first", n_jobs=1, cache_dir=cache)
    assert computed == 3
    # a corpus added: only its clip is computed, and the result is what a full computation gives
    _, computed = build(paths, feature_params, tmp_path / "mix", n_jobs=1, cache_dir=cache)
    assert computed == 1
    build(paths, feature_params, tmp_path / "plain", n_jobs=1)
    np.testing.assert_array_equal(np.load(tmp_path / "mix" / ARRAY_NAME), np.load(tmp_path / "plain" / ARRAY_NAME))
    np.testing.assert_array_equal(load_functionals(tmp_path / "mix", paths), load_functionals(tmp_path / "plain", paths))
    # other params: another cache, nothing stale reused
    other = dataclasses.replace(feature_params, fmin=40.0)
    assert cache_key(other) != cache_key(feature_params)
    assert build(paths, other, tmp_path / "other", n_jobs=1, cache_dir=cache)[1] == 4
    # the same audio under another name is the same clip
    (tmp_path / "copy.wav").write_bytes(open(paths[0], "rb").read())
    assert build([str(tmp_path / "copy.wav")], feature_params, tmp_path / "copy", n_jobs=1, cache_dir=cache)[1] == 0


def test_the_caches_of_older_code_are_deleted_and_nothing_else(tmp_path, feature_params):
    import dataclasses

    from ser.features import build, cache_key

    cache = tmp_path / "cache"
    older = [cache / "0123456789ab-0123456789ab", cache / "0123456789abcdef"]  # older code; the older naming
    keep = [cache / cache_key(dataclasses.replace(feature_params, fmin=40.0)), cache / "notes"]  # other params; not ours
    for d in older + keep:
        d.mkdir(parents=True)
    build([str(write_tone(tmp_path / "c.wav"))], feature_params, tmp_path / "features", n_jobs=1, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted([cache_key(feature_params)] + [d.name for d in keep])


def test_the_functionals_of_every_clip_are_stored_in_its_row_and_read_by_path(tmp_path, feature_params):
    import numpy as np

    from ser.features import build, load_functionals
    from ser.util import UserError

    paths = [str(write_tone(tmp_path / f"f{i}.wav", freq=120 + 60 * i)) for i in range(3)]
    build(paths, feature_params, tmp_path / "features", n_jobs=2)
    stored = load_functionals(tmp_path / "features", [paths[2], paths[0]])
    np.testing.assert_array_equal(stored[0], LogMel(feature_params).clip_features(paths[2])[1])
    np.testing.assert_array_equal(stored[1], LogMel(feature_params).clip_features(paths[0])[1])
    with pytest.raises(UserError, match="no features of"):
        load_functionals(tmp_path / "features", ["elsewhere.wav"])


def test_the_encoder_on_a_device_gives_the_features_of_the_workers_and_its_own_cache(tmp_path, feature_params):
    """The features stage's GPU path, run on the CPU: workers compute all but the encoder, which
    runs batched in the main process (float32); the same features within rounding, kept in a
    cache of their own (a GPU rounds differently), which a CPU run neither reads nor deletes."""
    import dataclasses

    from ser.features import cache_key, load_functionals

    fp = dataclasses.replace(feature_params, encoder="whisper-base", encoder_layers=3)  # both paths hear 3
    paths = [str(write_tone(tmp_path / f"c{i}.wav", seconds=0.3 + 0.4 * i, freq=150 + 50 * i)) for i in range(5)]
    cache = tmp_path / "cache"
    build(paths, fp, tmp_path / "workers", n_jobs=2, cache_dir=cache)
    assert build(paths, fp, tmp_path / "device", n_jobs=2, cache_dir=cache, encoder_device="cpu")[1] == 5
    np.testing.assert_array_equal(load(tmp_path / "device")[0], load(tmp_path / "workers")[0])
    on_device, in_workers = (load_functionals(tmp_path / d, paths) for d in ("device", "workers"))
    np.testing.assert_allclose(on_device, in_workers, rtol=1e-4, atol=1e-4)
    assert cache_key(fp, "cuda:0") == cache_key(fp) + "-cuda" and cache_key(feature_params, "cuda") == cache_key(feature_params)
    assert build(paths, fp, tmp_path / "again", n_jobs=1, cache_dir=cache)[1] == 0
    assert len(list(cache.iterdir())) == 2


def test_without_the_encoder_the_functionals_are_the_prosodys_alone(tmp_path, feature_params):
    from conftest import synthetic_dataset
    from ser.features import load_functionals
    from ser.prosody import n_functionals

    features, metadata = synthetic_dataset(tmp_path, feature_params, encoder="whisper-base")
    paths = ["a6/sad1.wav", "a1/angry0.wav"]
    every = load_functionals(features, paths)
    assert every.shape == (2, n_functionals(feature_params.n_mels) + 1024)
    np.testing.assert_array_equal(load_functionals(features, paths, encoder=False),
                                  every[:, : n_functionals(feature_params.n_mels)])
