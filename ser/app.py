"""A web page to try the trained model: upload or record a clip, see the emotion.

    ser app [--model data/model/model.pt] [--host 127.0.0.1] [--port 7860]

It scores audio with the batch labeller's own code (same decoding, windows, features and
model), so the page shows what `ser label` would write for the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ser.audio import AudioError, audio_info
from ser.grouping import GroupStatistics
from ser.labeller.loop import label_files
from ser.labeller.settings import DEFAULT_MODEL, DEFAULTS, Settings
from ser.labeller.speakers import gather_statistics
from ser.labeller.stream import FeatureStream
from ser.models import ModelFileError
from ser.trained import TrainedModel
from ser.util import is_loopback, process_alive

# A local tool contacts nobody: no usage analytics, no version check, no hub telemetry.
# Set before gradio (and huggingface_hub, which it imports) is loaded; they read them then.
for _name, _value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                      ("HF_HUB_OFFLINE", "1"), ("DO_NOT_TRACK", "1")):
    os.environ[_name] = _value
# Uploads and recordings older than --keep-uploads-s (default UPLOAD_MAX_AGE_S) are deleted by a
# sweep at least every UPLOAD_SWEEP_S (Gradio's delete_cache); the whole folder goes when the page stops.
UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S = 60, 600
MAX_DURATION_S = 600  # longer clips get a message (the batch labeller takes any length)


class Analyser:
    """Loads the model once; turns one audio file into a label, probabilities and a timeline."""

    def __init__(self, model_path: str | Path, settings: Settings, max_duration_s: float) -> None:
        self.model = TrainedModel.load(model_path, "cpu")
        self.classes: list[str] = self.model.classes
        self.settings = settings
        self.max_duration_s = max_duration_s
        self.by_speaker = self.model.by_speaker

    def too_long(self, path: Path) -> str | None:
        """A message for a clip over max_duration_s, judged from its header before decoding."""
        try:
            duration = audio_info(path)["duration_s"]
        except AudioError:
            return None  # label_files reports why the file cannot be read
        if duration > self.max_duration_s:
            return (f"The clip is {duration:.0f} s long; this page takes up to {self.max_duration_s:.0f} s "
                    "(use `ser label` for longer files).")
        return None

    def calibrate(self, path: str | Path | None) -> tuple[GroupStatistics | None, str]:
        """(statistics of the user's voice, message) from a recording of them speaking
        calmly; what a speaker-normalised model then hears every clip relative to."""
        if not self.by_speaker:
            return None, "This model normalises every clip by itself; it needs no calibration."
        if not path:
            return None, "No calibration recording yet: record a few seconds of yourself speaking calmly."
        path = Path(path)
        problem = self.too_long(path)
        # decoded once, by the labeller's own workers' code; a page recording is short (too_long)
        pieces = [] if problem else list(FeatureStream([path], self.model.extractor(), self.settings))
        problem = problem or next((p["error"].replace(f"{path}: ", "", 1) for p in pieces if p["error"]), None)
        if not problem and all(p["features"] is None for p in pieces):
            problem = f"silent (peak below {self.settings.silence_peak})"
        if problem:
            return None, f"Cannot calibrate with this recording: {problem}"
        stats = gather_statistics([path], ["you"], pieces, self.model.feature_params, min_windows=1)["you"]  # a reference, however short
        return stats, f"Calibrated on {pieces[0]['duration']:.1f} s of your voice: clips are now heard relative to it."

    def analyse(self, path: str | Path | None, calibration: GroupStatistics | None = None
                ) -> dict[str, Any]:
        """{'error': str} or {'emotion', 'confidence', 'probabilities', 'starts', 'ends',
        'window_probs', 'duration', 'normalised_by'}, computed by the batch labeller's own
        label_files (relative to the user's `calibration`, when given)."""
        if not path:
            return {"error": "No audio yet: upload a file or record from the microphone."}
        path = Path(path)
        message = self.too_long(path)
        if message:
            return {"error": message}
        files, segments = label_files([path], self.model, self.settings, calibration=calibration)
        row = files.iloc[0]
        if row["status"] != "ok":
            return {"error": "Cannot use this file: " + row["error"].replace(f"{path}: ", "", 1)}
        prob_columns = [f"prob_{c}" for c in self.classes]
        return {"emotion": row["emotion"], "confidence": float(row["confidence"]),
                "probabilities": dict(zip(self.classes, row[prob_columns].astype(float).tolist())),
                "starts": segments["start_s"].tolist(), "ends": segments["end_s"].tolist(),
                "window_probs": segments[prob_columns].to_numpy(dtype=float),
                "duration": float(row["duration_s"]), "normalised_by": row["normalised_by"],
                "uncertain": bool(row["uncertain"])}


def timeline_figure(result: dict[str, Any], classes: list[str]):
    """Emotion probabilities over time for clips with more than one window, else None."""
    if len(result["starts"]) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = (np.array(result["starts"]) + np.array(result["ends"])) / 2
    fig, ax = plt.subplots(figsize=(8, 3))
    for i, name in enumerate(classes):
        ax.plot(centres, result["window_probs"][:, i], marker="o", label=name)
    ax.set_xlabel("time (s, window centre)")
    ax.set_ylabel("probability")
    ax.set_ylim(0, 1)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    return fig


def build_page(analyser: Analyser, keep_uploads_s: float = UPLOAD_MAX_AGE_S):
    import gradio as gr

    def on_submit(path: str | None, calibration: GroupStatistics | None):
        result = analyser.analyse(path, calibration)
        if "error" in result:
            return f"**{result['error']}**", None, None
        heard = {"calibration": ", relative to your calibrated voice",
                 "window": ", relative to itself (calibrate to your voice for better labels)",
                 "population": ", relative to the average training voice (calibrate to your voice for better labels)"}
        label = (f"uncertain (perhaps {result['emotion']}, {result['confidence']:.0%}): this clip is out of the "
                 "model's depth" if result["uncertain"] else f"{result['emotion']} ({result['confidence']:.0%})")
        headline = (f"## {label}\n"
                    f"{result['duration']:.1f} s, {len(result['starts'])} window(s)"
                    f"{heard.get(result['normalised_by'], '')}")
        return headline, result["probabilities"], timeline_figure(result, analyser.classes)

    def on_calibrate(path: str | None):
        stats, message = analyser.calibrate(path)
        return stats, message

    with gr.Blocks(title="Speech emotion recognition", analytics_enabled=False,
                   delete_cache=(max(1, min(UPLOAD_SWEEP_S, int(keep_uploads_s / 2))), int(keep_uploads_s))) as page:
        gr.Markdown("# Speech emotion recognition\nUpload a clip (WAV, FLAC, OGG) or record one; "
                    "the model trained by this project's pipeline labels it with one of "
                    f"{len(analyser.classes)} emotions.")
        calibration = gr.State(None)  # per visitor: one person's voice is not another's
        with gr.Accordion("Calibrate to my voice (optional, first)", open=analyser.by_speaker):
            gr.Markdown("Record 5-10 seconds of yourself speaking calmly (neutral); the model then hears "
                        "your clips relative to your own voice and microphone.")
            voice = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your neutral voice",
                             elem_id="voice")
            calibrate = gr.Button("Use as my voice", elem_id="calibrate")
            calibrated = gr.Markdown(elem_id="calibrated")
        calibrate.click(on_calibrate, inputs=voice, outputs=[calibration, calibrated])
        audio = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Speech", elem_id="audio")
        button = gr.Button("Analyse", variant="primary", elem_id="analyse")
        headline = gr.Markdown(elem_id="headline")
        probabilities = gr.Label(num_top_classes=len(analyser.classes), label="Probabilities",
                                 elem_id="probabilities")
        timeline = gr.Plot(label="Emotion over time (clips longer than one window)", elem_id="timeline")
        button.click(on_submit, inputs=[audio, calibration], outputs=[headline, probabilities, timeline])
    return page


def login(host: str, password: str | None) -> list[tuple[str, str]] | None:
    """Gradio's auth list: the password when one is given (on a shared machine other users
    reach 127.0.0.1 too); else none when every address `host` resolves to is this machine's
    loopback (the resolved address decides, not the name); else ValueError, so the page never
    listens to a network unprotected."""
    if password:
        return [("ser", password)]
    if is_loopback(host):
        return None
    raise ValueError(f"--host {host} makes the page reachable from other machines: set a password "
                     "with --password or the SER_APP_PASSWORD environment variable (user name: ser)")


UPLOADS_PREFIX = "ser-app-uploads-"


def uploads_folder() -> Path:
    """This run's own folder for uploads, named with its process id, after removing the
    folders of runs that died without cleaning up (killed with -9: no `finally` ran)."""
    root = Path(tempfile.gettempdir())
    for old in root.glob(f"{UPLOADS_PREFIX}*"):
        pid = old.name[len(UPLOADS_PREFIX):].split("-", 1)[0]
        if old.is_dir() and not old.is_symlink() and pid.isdigit() and not process_alive(int(pid)) \
                and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{UPLOADS_PREFIX}{os.getpid()}-"))


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that `finally` removes the uploads, as on Ctrl-C


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ser app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s (what `make repro` trains)")
    parser.add_argument("--host", default="127.0.0.1", help="beyond 127.0.0.1 a password is required")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--password", default=os.environ.get("SER_APP_PASSWORD"),
                        help="log-in password (user: ser), asked on any host; needed beyond this machine; "
                        "default: $SER_APP_PASSWORD")
    parser.add_argument("--max-upload-mb", type=float, default=50)
    parser.add_argument("--keep-uploads-s", type=float, default=UPLOAD_MAX_AGE_S,
                        help="uploads and recordings older than this are deleted (default %(default)s)")
    parser.add_argument("--max-duration-s", type=float, default=MAX_DURATION_S,
                        help="longer clips get a message (default %(default)s)")
    args = parser.parse_args(argv)
    if args.keep_uploads_s < 2:
        parser.error("--keep-uploads-s must be 2 seconds or more")
    try:
        auth = login(args.host, args.password)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # one clip at a time: no worker processes; and no adaptation, which needs a group of several emotions
    settings = dataclasses.replace(DEFAULTS, n_jobs=1, adapt=False)
    try:
        analyser = Analyser(args.model, settings, args.max_duration_s)
    except ModelFileError as e:
        print(f"error: {e}\nTrain a model first: `make repro` (or `make repro ARCHIVE=... ARCHIVE_MD5=...`), "
              f"or pass --model PATH.", file=sys.stderr)
        return 2
    uploads = uploads_folder()
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)  # this run's own folder, removed when it stops
    print(f"uploads are kept in {uploads} for at most {args.keep_uploads_s:g} s and removed when the page stops",
          flush=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    page = build_page(analyser, args.keep_uploads_s)
    try:
        page.launch(server_name=args.host, server_port=args.port, auth=auth,
                    max_file_size=int(args.max_upload_mb * 1024 * 1024), show_error=False)
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
        shutil.rmtree(uploads, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
