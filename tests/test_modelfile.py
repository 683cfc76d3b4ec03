import pickle
import zipfile

from ser.models import load_checkpoint
from ser.modelfile import is_fused, read_model_info


def test_reads_what_the_full_load_reads(tiny_checkpoint):
    info = read_model_info(tiny_checkpoint)
    _, meta = load_checkpoint(tiny_checkpoint)
    assert info == {"classes": meta["classes"], "feature_params": meta["feature_params"],
                    "normalisation": meta["extra"].get("normalisation", "clip"), "fused": False,
                    "population": False, "unseen_temperature": 1.0}


def test_says_whether_the_model_fuses_a_linear_model(tmp_path, feature_params):
    from conftest import fused_model

    assert read_model_info(fused_model(tmp_path, feature_params, 40.0)[0])["fused"]
    assert not is_fused({"fusion": {"fusion_weight": 0.0}}) and not is_fused({})


def test_returns_none_for_files_that_are_not_model_files(tmp_path):
    (tmp_path / "text.pt").write_text("not a model")
    assert read_model_info(tmp_path / "text.pt") is None
    assert read_model_info(tmp_path / "missing.pt") is None


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Payload.marker}",))


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path):
    _Payload.marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"classes": _Payload(), "feature_params": {}}))
    assert read_model_info(path) is None
    assert not (tmp_path / "ran").exists()


def test_says_whether_the_file_has_the_average_training_speaker(tmp_path, feature_params):
    """What the cluster run's message is chosen by (it reads the file without torch)."""
    from conftest import fused_model

    path, _ = fused_model(tmp_path, feature_params, pitch_st=0.0)
    info = read_model_info(path)
    assert info["population"] and info["fused"] and info["normalisation"] == "speaker"
