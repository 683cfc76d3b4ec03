"""End to end: the real DVC pipeline on a slice of the real RAVDESS mirror, in a fresh repo."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import MIRROR, ROOT

ACTORS = ["Actor_01", "Actor_02", "Actor_13", "Actor_14", "Actor_17", "Actor_18"]


def _need_mirror():
    if not MIRROR.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"RAVDESS mirror missing at {MIRROR}; CI must have ../shared beside the repo")
        pytest.skip(f"RAVDESS mirror not found at {MIRROR}")


def _slice(dest: Path) -> str:
    with zipfile.ZipFile(MIRROR) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            if info.filename.split("/")[0] in ACTORS:
                out.writestr(info, src.read(info))
    return hashlib.md5(dest.read_bytes()).hexdigest()


def _own_recordings(dest: Path) -> Path:
    """A user's own labelled recordings: a zip of a folder with a manifest (24 tones, 2 speakers)."""
    from conftest import write_tone

    folder = dest.parent / "mine"
    rows = ["path,emotion,speaker"]
    for speaker in ("al", "bo"):
        for k, emotion in enumerate(("angry", "sad", "happy", "bored")):
            for take in range(3):
                write_tone(folder / speaker / f"{emotion}{take}.wav", seconds=1.5, freq=150 + 60 * k + 7 * take)
                rows.append(f"{speaker}/{emotion}{take}.wav,{emotion},{speaker}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder))
    return dest


def params_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def _run(args, cwd, env):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    _need_mirror()
    work = tmp_path_factory.mktemp("e2e")
    repo = work / "repo"
    repo.mkdir()
    for name in ["ser", "stages", "cv", "params.yaml", "dvc.yaml", ".gitignore"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, repo / name)
    md5 = _slice(work / "slice.zip")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"]["archives"] = {"ravdess": {"url": str(work / "slice.zip"), "md5": md5},
                                      "mine": {"url": str(_own_recordings(work / "mine.zip")), "md5": None}}
    params["metadata"]["corpora"] = {"ravdess": {"kind": "ravdess", "test_speakers": [17, 18],
                                                 "calibration_speakers": [14]},
                                     "mine": {"kind": "manifest", "manifest": "labels.csv", "test_speakers": ["bo"],
                                              "labels": {"bored": None}}}
    params["train"].update(epochs=2)
    params["cv"].update(folds="actors", fold_size=2)  # 6 actors: 3 folds of 2 (tests/test_crossval.py: speakers)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    first = _run(dvc + ["repro"], repo, env)
    return repo, env, dvc, first


MAIN_STAGES = ["download", "metadata", "features", "train", "evaluate", "predict"]


def _ran(out: str) -> set[str]:
    return {s for s in MAIN_STAGES + ["cv"] if f"Running stage '{s}'" in out or f"Running stage 'cv/dvc.yaml:{s}'" in out}


def test_repro_runs_every_stage_but_cv_and_writes_outputs(project):
    repo, _, _, first = project
    assert _ran(first) == set(MAIN_STAGES)  # cross-validation is its own pipeline
    clips = pd.read_parquet(repo / "data/metadata.parquet")
    ravdess, mine = clips[clips["corpus"] == "ravdess"], clips[clips["corpus"] == "mine"]
    assert len(ravdess) == 360 and set(ravdess["actor"]) == {1, 2, 13, 14, 17, 18}
    assert ravdess.groupby("split")["actor"].nunique().to_dict() == {"calibration": 1, "test": 2, "train": 3}
    # the manifest corpus: 18 clips (bored maps to no class: listed in the rejects), "bo" held out
    assert len(mine) == 18 and mine.groupby("split")["speaker"].unique().to_dict() == {
        "test": ["mine:bo"], "train": ["mine:al"]}
    rejects = pd.read_csv(repo / "data/metadata_rejects.csv")
    assert rejects["reason"].str.contains("label 'bored' maps to no class").sum() == 6
    train = json.loads((repo / "metrics/train.json").read_text())
    members = params_of(repo)["train"]["ensemble_seeds"]  # the default's seed ensemble
    assert train["members"] == members and train["epochs"] == 2 and train["device"] == "cpu"
    assert train["train_actors"] == [1, 2, 13] and train["train_clips"] == 180 + 9
    # probabilities calibrated on actor 14, whom the model never trained on
    assert train["temperature"] > 0 and train["calibration"]["clips"] == 60
    assert train["calibration"]["nll_after"] <= train["calibration"]["nll_before"]
    ev = json.loads((repo / "metrics/eval.json").read_text())
    assert ev["test_actors"] == [17, 18] and ev["test_clips"] == 120 + 9
    assert {c: v["clips"] for c, v in ev["per_corpus"].items()} == {"ravdess": 120, "mine": 9}
    for key in ["test_accuracy", "test_uar", "test_macro_f1", "test_loss"]:
        assert 0 <= ev[key] <= (10 if key == "test_loss" else 1)
    assert set(ev["accuracy_by_sex"]) == {"male", "female"}
    assert set(ev["accuracy_by_intensity"]) == {"normal", "strong"}
    assert len(ev["per_class"]) == 8
    assert ev["temperature"] == train["temperature"] and 0 <= ev["test_ece"] <= 1 and 0 <= ev["uncertain_share"] <= 1
    reliability = pd.read_csv(repo / "reports/reliability.csv")
    assert reliability["clips"].sum() == 129 and reliability["accuracy"].between(0, 1).all()
    assert (repo / "reports/confusion_matrix.png").stat().st_size > 10_000
    tested = pd.read_csv(repo / "reports/test_predictions.csv")  # each test clip, its calibrated probabilities
    probs = tested.filter(like="prob_")
    assert len(tested) == 129 and probs.shape[1] == 8 and np.allclose(probs.sum(axis=1), 1, atol=1e-3)
    assert (probs.idxmax(axis=1).str[5:] == tested["predicted"]).all()
    history = pd.read_csv(repo / "reports/train_history.csv")
    assert history.groupby("member")["epoch"].apply(list).tolist() == [[1, 2]] * members
    predictions = pd.read_csv(repo / "data/predictions.csv")  # the labeller: every audio file extracted
    assert len(predictions) == 360 + 24 and (predictions["status"] == "ok").all()
    # the predict stage (predict.speakers: all) hears every file relative to all of them: one group
    speaker_model = params_of(repo)["train"]["normalisation"] == "speaker"
    assert predictions["uncertain"].isin([True, False]).all()
    assert (predictions["normalised_by"] == ("all" if speaker_model else "clip")).all()
    # and evaluate says what a speaker model does when it knows less of who is who, and adapted to each group
    assert set(ev["by_grouping"]) == ({"corpus", "clip", "population", "adapted_speaker", "adapted_corpus"}
                                      if speaker_model else set())
    assert all(0 <= g["uar"] <= 1 and 0 <= g["ece"] <= 1 for g in ev["by_grouping"].values())
    for g in ev["by_grouping"].values():  # each corpus's share of the accuracy, weighted by its test clips
        assert set(g["accuracy_per_corpus"]) == set(ev["per_corpus"])
        weighted = sum(a * ev["per_corpus"][c]["clips"] for c, a in g["accuracy_per_corpus"].items())
        assert weighted / ev["test_clips"] == pytest.approx(g["accuracy"], abs=1e-4)


def test_status_clean_and_second_repro_does_nothing(project):
    repo, env, dvc, _ = project
    assert "up to date" in _run(dvc + ["status", "dvc.yaml"], repo, env)  # cv/dvc.yaml runs with `make cv`
    # bytecode that Python writes beside the library is not a code change
    (repo / "ser" / "__pycache__").mkdir(exist_ok=True)
    (repo / "ser" / "__pycache__" / "metrics.cpython-311.pyc").write_bytes(b"\x00bytecode")
    assert "up to date" in _run(dvc + ["status", "dvc.yaml"], repo, env)
    assert "Running stage" not in _run(dvc + ["repro"], repo, env)


def test_cv_is_its_own_pipeline_over_the_ravdess_actors(project):
    repo, env, dvc, _ = project
    out = _run(dvc + ["repro", "cv/dvc.yaml"], repo, env)
    assert _ran(out) == {"cv"}
    cv = json.loads((repo / "metrics/cv.json").read_text())
    assert cv["folds"] == 3 and 0 <= cv["test_accuracy_mean"] <= 1 and cv["test_accuracy_std"] >= 0
    folds = pd.read_csv(repo / "reports/cv_folds.csv")
    assert folds["test_speakers"].tolist() == ["ravdess:01 ravdess:02", "ravdess:13 ravdess:14",
                                               "ravdess:17 ravdess:18"]
    # the train stage's model also learnt the manifest corpus: it is no RAVDESS fold, so every
    # fold trains (tests/test_crossval.py covers the reuse of a model that is one)
    assert folds["model"].tolist() == ["trained here"] * 3 and cv["folds_from_train_stage"] == []
    predictions = pd.read_csv(repo / "reports/cv_predictions.csv")
    assert len(predictions) == 360 and predictions["path"].str.contains("/ravdess/").all()


def test_a_library_change_stales_exactly_the_stages_that_run_it(project):
    repo, env, dvc, _ = project
    for module, stale in (("audio.py", set(MAIN_STAGES) - {"download"}),  # decoding: every stage that reads audio
                          ("labeller/cli.py", {"predict"}),  # the command: no retraining
                          ("training.py", {"train", "evaluate"}),  # the training loop: no relabelling
                          ("metrics.py", {"evaluate"})):
        library_file = repo / "ser" / module
        original = library_file.read_text()
        library_file.write_text(original + "\n# a change\n")
        try:
            status = json.loads(_run(dvc + ["status", "--json"], repo, env))
        finally:
            library_file.write_text(original)
        assert {name for name in status if name in MAIN_STAGES} == stale, (module, status)


def test_train_param_experiment_reruns_only_downstream_and_diffs(project):
    repo, env, dvc, _ = project
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "baseline"], repo, env)
    out = _run(dvc + ["exp", "run", "-S", "train.epochs=1"], repo, env)
    assert _ran(out) == {"train", "evaluate", "predict"}
    diff = json.loads(_run(dvc + ["metrics", "diff", "--json"], repo, env))
    assert {"metrics/eval.json", "metrics/train.json"} <= set(diff)
    assert diff["metrics/train.json"]["epochs"] == {"old": 2, "new": 1, "diff": -1}
    plots = json.loads(_run(dvc + ["plots", "diff", "--json"], repo, env))["data"]
    assert {"Loss", "Accuracy (training clips)", "Confusion (test actors)"} <= set(plots)
    assert set(plots["Loss"][0]["revisions"]) == {"workspace", "HEAD"}


@pytest.fixture
def s3_server(tmp_path):
    """A real S3-compatible object store (moto's server, its own process) on 127.0.0.1, with a bucket."""
    import socket
    import time

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    credentials = {"AWS_ACCESS_KEY_ID": "team", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_DEFAULT_REGION": "us-east-1"}
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="team", aws_secret_access_key="secret",
                     region_name="us-east-1").create_bucket(Bucket="ser-team")
        yield endpoint, credentials
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_a_colleague_pulls_the_model_from_the_team_remote_and_labels_without_training(project, s3_server, tmp_path):
    """README's team set-up: `dvc remote add` an S3 bucket, `dvc push`; a fresh clone's
    `dvc pull train` fetches the model (checked by hash), which labels a folder at once."""
    from conftest import write_tone

    repo, env, dvc, _ = project
    endpoint, credentials = s3_server
    env = {**env, **credentials}
    _run(dvc + ["remote", "add", "-d", "team", "s3://ser-team/cache"], repo, env)
    _run(dvc + ["remote", "modify", "team", "endpointurl", endpoint], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "trained, with the team remote"], repo, env)
    assert "pushed" in _run(dvc + ["push"], repo, env)
    colleague = tmp_path / "colleague"
    _run(["git", "clone", "-q", str(repo), str(colleague)], tmp_path, env)
    assert not (colleague / "data").exists()
    _run(dvc + ["pull", "train"], colleague, env)  # the model (and the features it was trained on)
    model = "data/model/model.pt"
    assert hashlib.md5((colleague / model).read_bytes()).hexdigest() == hashlib.md5((repo / model).read_bytes()).hexdigest()
    write_tone(tmp_path / "calls" / "a.wav", seconds=2.0)
    write_tone(tmp_path / "calls" / "b.wav", seconds=3.0, freq=330)
    _run([sys.executable, "-m", "ser", "label", str(tmp_path / "calls"), "-o", str(tmp_path / "labels.csv"),
          "--model", str(colleague / model)], colleague, env)
    labels = pd.read_csv(tmp_path / "labels.csv")
    assert len(labels) == 2 and (labels["status"] == "ok").all()
