"""The demo page: its prediction function, and the real page in headless Chromium."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import MIRROR, ROOT, write_tone
from ser.app import Analyser, timeline_figure
from ser.corpora import EMOTIONS
from ser.labeller.settings import Settings

# float32: "auto" is bfloat16 on CPUs with native units, whose rounding depends on the batch
SETTINGS = Settings(batch_size=16, n_jobs=1, min_duration_s=0.1, silence_peak=1e-4, segment_s=6.0, hop_s=3.0,
                    max_queued_windows=256, precision="float32", adapt=False)


@pytest.fixture
def analyser(tiny_checkpoint):
    return Analyser(tiny_checkpoint, SETTINGS, max_duration_s=30)


def test_a_clip_gets_a_label_and_all_probabilities(analyser, tmp_path):
    result = analyser.analyse(write_tone(tmp_path / "a.wav", seconds=2.0, sr=44100, channels=2))
    assert result["emotion"] in EMOTIONS
    assert set(result["probabilities"]) == set(EMOTIONS)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert result["confidence"] == pytest.approx(max(result["probabilities"].values()))
    assert timeline_figure(result, EMOTIONS) is None  # one window: no timeline


def test_a_long_clip_gets_a_timeline(analyser, tmp_path):
    result = analyser.analyse(write_tone(tmp_path / "long.flac", seconds=14.0, sr=16000))
    assert len(result["starts"]) == 4
    figure = timeline_figure(result, EMOTIONS)
    assert figure is not None and len(figure.axes[0].lines) == len(EMOTIONS)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "No audio yet"),
    (lambda d: (d / "x.wav").write_text("not audio") and d / "x.wav", "Cannot use this file: not readable audio"),
    (lambda d: (d / "e.wav").write_bytes(b"") or d / "e.wav", "Cannot use this file: empty file"),
    (lambda d: write_tone(d / "short.wav", seconds=0.05), "too short"),
    (lambda d: write_tone(d / "long.wav", seconds=31.0, sr=8000), "this page takes up to 30 s"),
])
def test_bad_input_gives_a_readable_message(analyser, tmp_path, make, message):
    result = analyser.analyse(make(tmp_path))
    assert set(result) == {"error"} and message in result["error"] and "Traceback" not in result["error"]


@pytest.fixture
def speaker_analyser(tmp_path, feature_params):
    import torch

    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(1)
    arch = {**TINY_ARCH, "utterance_norm": False}
    save_checkpoint(tmp_path / "spk.pt", build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS,
                    feature_params, extra={"normalisation": "speaker"})
    return Analyser(tmp_path / "spk.pt", SETTINGS, max_duration_s=30)


def test_calibrating_to_a_voice_hears_clips_relative_to_it(speaker_analyser, tmp_path):
    from ser.labeller.cli import main

    voice = write_tone(tmp_path / "voice.wav", seconds=8.0, freq=180)
    clip = write_tone(tmp_path / "clip.wav", seconds=2.0, freq=260)
    stats, message = speaker_analyser.calibrate(voice)
    assert message.startswith("Calibrated on 8.0 s of your voice") and stats.bands[0].shape == (32,)
    assert stats.functionals is None  # a model without a linear model: its workers skip the functionals
    calibrated = speaker_analyser.analyse(clip, stats)
    alone = speaker_analyser.analyse(clip)
    assert calibrated["normalised_by"] == "calibration" and alone["normalised_by"] == "window"
    assert max(abs(calibrated["probabilities"][c] - alone["probabilities"][c]) for c in EMOTIONS) > 1e-3
    # calibrating with the clip itself is --speakers file on that clip
    stats_self, _ = speaker_analyser.calibrate(clip)
    assert main([str(clip), "-o", str(tmp_path / "f.csv"), "--model", str(tmp_path / "spk.pt"), "--speakers", "file",
                 "--precision", "float32", "--min-group-windows", "1"]) == 0
    import pandas as pd

    row = pd.read_csv(tmp_path / "f.csv").iloc[0]
    by_self = speaker_analyser.analyse(clip, stats_self)["probabilities"]
    assert [by_self[c] for c in EMOTIONS] == pytest.approx([row[f"prob_{c}"] for c in EMOTIONS], abs=2e-5)


def test_a_fused_model_hears_a_clip_relative_to_the_calibrated_voices_pitch(tmp_path, feature_params):
    from conftest import fused_model
    from ser.audio import LogMel
    from ser.labeller.reading import prepare
    from ser.fusion import log_softmax, standardise
    from ser.prosody import n_functionals

    model, head = fused_model(tmp_path, feature_params, 12 * np.log2(250 / 27.5))
    analyser = Analyser(model, SETTINGS, max_duration_s=30)
    deep_voice = write_tone(tmp_path / "voice.wav", seconds=8.0, freq=110)
    clip = write_tone(tmp_path / "clip.wav", seconds=2.0, freq=160)
    assert analyser.analyse(clip)["emotion"] == "sad"  # below the average training voice's 250 Hz
    stats, _ = analyser.calibrate(deep_voice)
    assert stats.windows == 2 and stats.functionals[0].shape == (n_functionals(feature_params.n_mels),)
    calibrated = analyser.analyse(clip, stats)
    assert calibrated["emotion"] == "angry"  # above this speaker's own pitch
    # two windows of calibration speech: their mean, and the training speakers' spread (test_grouping)
    voice_f = prepare(deep_voice, LogMel(feature_params), SETTINGS)["functionals"]
    clip_f = prepare(clip, LogMel(feature_params), SETTINGS)["functionals"]
    expected = np.exp(log_softmax(head.logits(standardise(clip_f, voice_f.mean(axis=0), head.population[1]))))
    assert [calibrated["probabilities"][c] for c in EMOTIONS] == pytest.approx(expected.mean(axis=0), abs=2e-5)


def test_an_uncalibrated_clip_is_heard_relative_to_the_average_training_voice(tmp_path, feature_params):
    import torch

    from conftest import TINY_ARCH
    from ser.models import build_model, save_checkpoint

    torch.manual_seed(1)
    arch = {**TINY_ARCH, "utterance_norm": False}
    population = [[-40.0] * feature_params.n_mels, [10.0] * feature_params.n_mels]
    save_checkpoint(tmp_path / "pop.pt", build_model(arch, feature_params.n_mels, len(EMOTIONS)), arch, EMOTIONS,
                    feature_params, extra={"normalisation": "speaker", "population": population})
    analyser = Analyser(tmp_path / "pop.pt", SETTINGS, max_duration_s=30)
    clip = write_tone(tmp_path / "clip.wav", seconds=2.0, freq=260)
    alone = analyser.analyse(clip)
    assert alone["normalised_by"] == "population"
    voice = write_tone(tmp_path / "voice.wav", seconds=8.0, freq=180)
    stats, _ = analyser.calibrate(voice)  # a short reference still calibrates (no group minimum)
    assert analyser.analyse(clip, stats)["normalised_by"] == "calibration"


def test_calibration_refuses_what_it_cannot_use(speaker_analyser, analyser, tmp_path):
    stats, message = speaker_analyser.calibrate(None)
    assert stats is None and "No calibration recording yet" in message
    sf.write(str(tmp_path / "silent.wav"), np.zeros(32000, dtype=np.int16), 16000)
    stats, message = speaker_analyser.calibrate(tmp_path / "silent.wav")
    assert stats is None and message.startswith("Cannot calibrate with this recording: silent")
    stats, message = analyser.calibrate(write_tone(tmp_path / "v.wav", seconds=3.0))
    assert stats is None and "needs no calibration" in message


def test_no_model_gives_how_to_train(tmp_path, capsys, monkeypatch):
    from ser import app

    monkeypatch.chdir(ROOT)
    assert app.main(["--model", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    assert "no model file" in err and "make repro" in err


def test_listening_beyond_localhost_needs_a_password(tiny_checkpoint, capsys, monkeypatch):
    from ser import app

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SER_APP_PASSWORD", raising=False)
    assert app.main(["--model", str(tiny_checkpoint), "--host", "0.0.0.0"]) == 2
    assert "set a password with --password or the SER_APP_PASSWORD" in capsys.readouterr().err
    assert app.login("127.0.0.1", None) is None and app.login("localhost", None) is None
    assert app.login("0.0.0.0", "s3cret") == [("ser", "s3cret")]


# Runs the page with every DNS look-up and connection to a non-loopback address logged.
NETWORK_AUDIT = r"""
import os, runpy, socket, sys
log = open(os.environ["NETWORK_AUDIT_LOG"], "a", buffering=1)
def local(host):
    return str(host) in ("localhost", "::1", "0.0.0.0", "") or str(host).startswith("127.")
real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex
def getaddrinfo(host, *args, **kwargs):
    if not local(host):
        log.write(f"lookup {host}\n")
    return real_getaddrinfo(host, *args, **kwargs)
def connect(self, address):
    if isinstance(address, tuple) and not local(address[0]):
        log.write(f"connect {address}\n")
    return real_connect(self, address)
def connect_ex(self, address):
    if isinstance(address, tuple) and not local(address[0]):
        log.write(f"connect {address}\n")
    return real_connect_ex(self, address)
socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
sys.argv = ["ser", "app", *sys.argv[1:]]
runpy.run_module("ser", run_name="__main__")
"""


def _upload(url: str, path: Path, opener=None) -> str:
    boundary = "----ser-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    import json

    return json.loads((opener.open if opener else urllib.request.urlopen)(request, timeout=30).read())[0]


def test_uploads_expire_while_the_page_runs_and_go_when_it_stops(tiny_checkpoint, tmp_path):
    proc, url, log, uploads = _start_app(tiny_checkpoint, tmp_path, "--keep-uploads-s", "2")
    try:
        stored = Path(_upload(url, write_tone(tmp_path / "mine.wav", seconds=1.0)))
        assert stored.is_file() and uploads in stored.parents
        deadline = time.time() + 30
        while stored.exists() and time.time() < deadline:
            time.sleep(0.5)
        assert not stored.exists()  # swept while the page still runs
        again = Path(_upload(url, write_tone(tmp_path / "again.wav", seconds=1.0)))
        assert again.is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not uploads.exists()  # nothing of the user's left behind in the temp folder
    assert log.read_text() == "", log.read_text()


# ---- the real page in headless Chromium -------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(model_path: Path, work: Path, *args: str, env: dict | None = None):
    """The page in a process whose every look-up and connection beyond this machine is logged
    (NETWORK_AUDIT): (process, url, the log, its uploads folder)."""
    port = _free_port()
    log = work / f"network-{port}.log"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", NETWORK_AUDIT, "--model", str(model_path), "--port", str(port),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {}), "NETWORK_AUDIT_LOG": str(log)})
    try:
        first_line = proc.stdout.readline()
        assert first_line.startswith("uploads are kept in "), first_line + proc.stdout.read()
        url = f"http://127.0.0.1:{port}/"
        _wait_for_page(proc, url)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc, url, log, Path(first_line.split()[4])


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are missing (make test installs them)")
        pytest.skip("chromium/chromedriver not installed")
    if not MIRROR.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"RAVDESS mirror missing at {MIRROR}")
        pytest.skip("mirror not found")
    import torch

    from conftest import TINY_ARCH
    from ser.audio import FeatureParams
    from ser.models import build_model, save_checkpoint

    work = tmp_path_factory.mktemp("app")
    fp = FeatureParams(sample_rate=16000, duration_s=3.2, n_mels=64, n_fft=1024, hop_length=256,
                       fmin=20.0, fmax=8000.0, trim_db=30.0, amin=1e-10, top_db=80.0)
    torch.manual_seed(0)
    model_path = work / "model.pt"
    save_checkpoint(model_path, build_model(TINY_ARCH, fp.n_mels, len(EMOTIONS)), TINY_ARCH, EMOTIONS, fp, {})
    with zipfile.ZipFile(MIRROR) as zf:
        clip = work / "clip.wav"
        clip.write_bytes(zf.read("Actor_01/03-01-05-02-01-01-01.wav"))
    # uploads over 1 MB are refused: small enough for a test file, far above a clip's size
    proc, url, log, _ = _start_app(model_path, work, "--max-upload-mb", "1")
    yield url, clip, work, log
    proc.terminate()
    proc.wait(timeout=20)


def _browser(work: Path, fake_audio: Path | None = None):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--window-size=1200,1400",
                 f"--user-data-dir={work / ('profile-mic' if fake_audio else 'profile')}"]:
        options.add_argument(flag)
    if fake_audio:
        options.add_argument(f"--use-file-for-fake-audio-capture={fake_audio}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _wait_for_label(driver, timeout=60) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def headline(d):
        text = d.find_element(By.ID, "headline").text.strip()
        return text if any(text.startswith(e) for e in EMOTIONS + ["uncertain (perhaps "]) else False

    return WebDriverWait(driver, timeout).until(headline)


def _shown_emotion(headline: str) -> str:
    """The emotion of the page's headline: "angry (61%)", or for a clip below 50% confidence
    (the untrained test model's every clip) "uncertain (perhaps angry, 14%): ..."."""
    if headline.startswith("uncertain (perhaps "):
        return headline.removeprefix("uncertain (perhaps ").split(",")[0]
    return headline.split()[0]


def _requested_hosts(driver) -> set[str]:
    """The hosts of every network request the browser made (Chrome's performance log; its own
    chrome:// pages, data: and blob: URLs go nowhere)."""
    import json
    import urllib.parse

    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            parsed = urllib.parse.urlparse(message["params"]["request"]["url"])
            if parsed.scheme in ("http", "https", "ws", "wss", "ftp"):
                hosts.add(parsed.hostname)
    return hosts


def test_page_upload_shows_label_and_chart_and_nobody_else_is_contacted(page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, clip, work, log = page_server
    driver = _browser(work)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#audio input[type=file]").send_keys(str(clip))
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio button.play-pause-button"))
        driver.find_element(By.ID, "analyse").click()
        label = _wait_for_label(driver)
        chart = driver.find_element(By.ID, "probabilities").text
        assert sum(e in chart for e in EMOTIONS) == len(EMOTIONS), chart
        driver.save_screenshot(str(work / "app_test_screenshot.png"))  # never into the tracked tree
        assert _shown_emotion(label) in EMOTIONS
        hosts = _requested_hosts(driver)
        assert hosts == {"127.0.0.1"}, hosts  # no font, script or beacon from elsewhere
    finally:
        driver.quit()
    assert log.read_text() == "", log.read_text()  # nor did the server, analysing it


def test_page_records_from_the_fake_microphone(page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, clip, work, _ = page_server
    driver = _browser(work, fake_audio=clip)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio button"))
        mic = [b for b in driver.find_elements(By.CSS_SELECTOR, "#audio button")
               if (b.get_attribute("aria-label") or "").lower() == "record audio"]
        assert mic, "no microphone source button"
        mic[0].click()
        record = WebDriverWait(driver, 30).until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "#audio button")
                                                           if "record" in b.text.lower()])
        record[0].click()
        time.sleep(3)
        stop = WebDriverWait(driver, 30).until(lambda d: [b for b in d.find_elements(By.CSS_SELECTOR, "#audio button")
                                                         if "stop" in b.text.lower()])
        stop[0].click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio button.play-pause-button"))
        driver.find_element(By.ID, "analyse").click()
        assert _shown_emotion(_wait_for_label(driver)) in EMOTIONS
    finally:
        driver.quit()


def test_page_refuses_a_too_large_upload_with_a_message(page_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, work, _ = page_server
    big = work / "big.wav"
    sf.write(str(big), np.zeros(16000 * 40, dtype=np.float32), 16000)  # 2.6 MB > 1 MB
    driver = _browser(work)
    try:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#audio input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#audio input[type=file]").send_keys(str(big))
        WebDriverWait(driver, 30).until(
            lambda d: "exceed the maximum allowed size" in d.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()


def test_the_password_rule_decides_on_the_resolved_address(monkeypatch):
    from ser import app

    real = socket.getaddrinfo
    fake = {"127.0.0.1.example": "0.0.0.0", "intranet.example": "10.1.2.3", "lo.example": "127.0.0.5"}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "",
                        (fake[host], 0))] if host in fake else real(host, *a, **k))
    for host in ("127.0.0.1.example", "intranet.example", "0.0.0.0", "", "no-such-host.invalid"):
        with pytest.raises(ValueError, match="reachable from other machines"):
            app.login(host, None)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "lo.example"):
        assert app.login(host, None) is None
    assert app.login("127.0.0.1", "s3cret") == [("ser", "s3cret")]  # asked for: kept on this machine too


def _wait_for_page(proc, url: str) -> None:
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # answering (a login page, a 401): up
            return
        except OSError:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.5)


def test_with_a_password_a_request_without_it_is_refused(tiny_checkpoint, tmp_path):
    import http.cookiejar
    import urllib.parse

    proc, url, _, _ = _start_app(tiny_checkpoint, tmp_path, env={"SER_APP_PASSWORD": "s3cret"})
    try:
        clip = write_tone(tmp_path / "mine.wav", seconds=1.0)
        with pytest.raises(urllib.error.HTTPError) as refused:
            _upload(url, clip)
        assert refused.value.code == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        for password, accepted in (("wrong", False), ("s3cret", True)):
            form = urllib.parse.urlencode({"username": "ser", "password": password}).encode()
            try:
                opener.open(url + "login", data=form, timeout=30).read()
                assert accepted
            except urllib.error.HTTPError as e:
                assert not accepted and e.code in (400, 401), e.code
        assert Path(_upload(url, clip, opener)).is_file()  # logged in: the same request goes through
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_uploads_of_a_page_killed_with_9_are_removed_by_the_next_start(tiny_checkpoint, tmp_path):
    import signal

    temp = tmp_path / "tmp"
    temp.mkdir()
    (temp / "ser-app-uploads-notmine").mkdir()  # no process id in the name: not a folder this code made
    (temp / "users-file.wav").write_bytes(b"keep")
    runs = []
    for _ in range(2):
        runs.append(_start_app(tiny_checkpoint, tmp_path, env={"TMPDIR": str(temp)}))
        if len(runs) == 1:
            proc, _, _, uploads = runs[0]
            (uploads / "upload.wav").write_bytes(b"an upload")
            proc.send_signal(signal.SIGKILL)  # no `finally` runs
            proc.wait(timeout=30)
            assert uploads.exists()
    runs = [(proc, uploads) for proc, _, _, uploads in runs]
    try:
        assert not runs[0][1].exists() and runs[1][1].is_dir()  # the dead run's, not the live one's
        assert (temp / "ser-app-uploads-notmine").is_dir() and (temp / "users-file.wav").read_bytes() == b"keep"
    finally:
        runs[1][0].terminate()
        runs[1][0].wait(timeout=30)
    assert not runs[1][1].exists()
