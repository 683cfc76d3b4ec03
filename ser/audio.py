"""Audio loading and the log-Mel feature: the one code path for training and prediction."""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import scipy.fft
import soundfile as sf

from ser import encoder, prosody
from ser.dsp import fix_length, mel_filterbank, resample

# What libsndfile (soundfile's bundled 1.2) decodes: read by content, listed by extension so that
# a folder's other files are left alone. .ogg/.oga/.opus: Vorbis or Opus in Ogg.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
# Audio it cannot decode (AAC, WMA, AMR, video containers): the labeller gives these an error row
# saying so, rather than leaving them out of a folder's labels without a word.
UNREADABLE_AUDIO_EXTENSIONS = (".m4a", ".aac", ".mp4", ".wma", ".amr", ".3gp", ".webm")
# Decoders (libsndfile's format names, whatever the file is called) to read in one piece only:
# libsndfile 1.2.2's MP3 decoder returned wrong samples (errors the size of the signal) after a read
# boundary for a 22.05 kHz file, though the whole file in one read was right; so an MP3 is labelled
# only when it fits one window (docs/performance.md).
ONE_READ_ONLY = ("MP3",)
# Lossy decoders rebuild a sample from the frames before it: read straight after a seek, Vorbis
# gave samples off by up to 0.9 (full scale 1) for the first ~50 ms. A seek lands this much earlier
# and the extra is dropped: then every window equals the decode of the whole file (tests/test_audio.py).
SEEK_PREROLL_S = 0.2


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and the reason."""


@dataclass(frozen=True)
class FeatureParams:
    sample_rate: int
    duration_s: float
    n_mels: int
    n_fft: int
    hop_length: int
    fmin: float
    fmax: float
    trim_db: float | None  # None: keep leading/trailing silence
    amin: float  # power floor before log
    top_db: float | None  # dB relative to the clip's peak (loudness-invariant); None: absolute dB
    encoder: str | None = None  # a pretrained encoder's summary appended to the functionals (ser.encoder)
    encoder_layers: int | None = None  # only its first so many layers (None: all)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureParams":
        names = [n for n in cls.__dataclass_fields__ if n in d]  # a model file older than a field: its default
        missing = [f.name for f in fields(cls) if f.name not in d and f.default is MISSING]
        if missing:
            raise KeyError(f"feature params missing {missing}")
        fp = cls(**{n: d[n] for n in names})
        fp.validate()
        return fp

    def validate(self) -> None:
        """ValueError unless every value is in a range where one clip's features cost at most
        a few MB: a model file (or features dir) cannot make each clip allocate gigabytes."""
        def number(name: str, low: float, high: float, optional: bool = False) -> None:
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"feature param {name}={value!r} is outside [{low:g}, {high:g}]")

        number("sample_rate", 4000, 192000)
        number("duration_s", 0.1, 60)
        number("n_mels", 1, 512)
        number("n_fft", 16, 16384)
        number("hop_length", 1, self.n_fft)
        number("fmin", 0, self.sample_rate / 2)
        number("fmax", self.fmin, self.sample_rate / 2)
        number("trim_db", 1e-3, 200, optional=True)
        number("amin", 1e-30, 1)
        number("top_db", 1e-3, 400, optional=True)
        encoder.check_name(self.encoder)
        encoder.check_layers(self.encoder, self.encoder_layers)
        if self.n_samples // self.hop_length > 1 << 16:
            raise ValueError(f"feature params make {self.n_frames} frames per clip (at most {1 << 16})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    @property
    def floor_db(self) -> float:
        """The lowest value the log-Mel takes (padding and silence sit there)."""
        return -self.top_db if self.top_db is not None else 10 * math.log10(self.amin)

    @property
    def n_frames(self) -> int:
        # librosa's centred STFT: one frame per hop plus the first
        return 1 + self.n_samples // self.hop_length


def audio_info(path: str | Path) -> dict[str, Any]:
    """Sample rate, channels, frames and duration read from the header."""
    try:
        info = sf.info(os.fsencode(path))  # bytes: a name that is not UTF-8 opens too
    except Exception as e:  # soundfile raises several types; all mean "not readable audio"
        raise AudioError(f"{path}: not readable audio ({_reason(e)})") from None
    return {
        "sample_rate": int(info.samplerate),
        "channels": int(info.channels),
        "frames": int(info.frames),
        "duration_s": float(info.frames) / info.samplerate if info.samplerate else 0.0,
    }


def load_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode a whole file to mono float32 at `sample_rate`. Raises AudioError naming the file."""
    _, _, y = next(read_windows(path, sample_rate, math.inf, math.inf))
    return y


def iter_window_bounds(duration_s: float, segment_s: float, hop_s: float) -> Iterator[tuple[float, float]]:
    """(start, end) seconds of the analysis windows of a recording, made one at a time (a
    header may claim years of audio): the whole recording when it is at most segment_s
    long, else windows of segment_s every hop_s, the last one ending at the end."""
    if duration_s <= segment_s:
        yield (0.0, duration_s)
        return
    # np.arange(0, duration_s - segment_s, hop_s)'s values, then the last window
    for k in range(int(math.ceil((duration_s - segment_s) / hop_s))):
        yield round(k * hop_s, 3), round(k * hop_s + segment_s, 3)
    last = duration_s - segment_s
    yield round(last, 3), round(last + segment_s, 3)


def count_windows(duration_s: float, segment_s: float, hop_s: float) -> int:
    """len(window_bounds(...)), without making them."""
    return 1 if duration_s <= segment_s else int(math.ceil((duration_s - segment_s) / hop_s)) + 1


def window_bounds(duration_s: float, segment_s: float, hop_s: float) -> list[tuple[float, float]]:
    """All of iter_window_bounds as a list."""
    return list(iter_window_bounds(duration_s, segment_s, hop_s))


class AudioFile:
    """An audio file open for reading, window by window; every failure is an AudioError
    naming the file. The header is read once, on opening."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise AudioError(f"{self.path}: is a directory, not an audio file")
        try:
            self._file = sf.SoundFile(os.fsencode(self.path))  # bytes: a name that is not UTF-8 opens too
        except Exception as e:  # soundfile raises several types; all mean "not readable audio"
            suffix = self.path.suffix.lower()
            if suffix in UNREADABLE_AUDIO_EXTENSIONS:
                raise AudioError(f"{self.path}: {suffix} audio cannot be read here; convert it to WAV or FLAC "
                                 f"first (e.g. ffmpeg -i in{suffix} out.wav)") from None
            raise AudioError(f"{self.path}: not readable audio ({_reason(e)})") from None
        if self._file.frames == 0:
            self._file.close()
            raise AudioError(f"{self.path}: contains no audio samples")

    @property
    def duration_s(self) -> float:
        return self._file.frames / self._file.samplerate

    @property
    def sample_rate(self) -> int:
        return int(self._file.samplerate)

    @property
    def channels(self) -> int:
        return int(self._file.channels)

    @property
    def format(self) -> str:
        """The decoder libsndfile chose from the content (WAV, FLAC, OGG, MP3...)."""
        return str(self._file.format)

    @property
    def frames(self) -> int:
        return int(self._file.frames)

    def windows(self, sample_rate: int, segment_s: float, hop_s: float, first: int = 0,
                count: int | None = None) -> Iterator[tuple[float, float, np.ndarray]]:
        """Yield (start_s, end_s, mono float32 at sample_rate) per window, `count` windows
        (None: all) from window number `first` on. The file is read forward from one seek (its
        preroll dropped, SEEK_PREROLL_S), each sample once: held are only the samples from the
        current window's start on, so a long recording never sits in memory whole."""
        f, sr, frames = self._file, self._file.samplerate, self._file.frames
        bounds = iter_window_bounds(frames / sr, segment_s, hop_s)
        held, held_from = np.empty((0, f.channels), dtype=np.float32), -1  # samples [held_from, ...)
        for start, end in itertools.islice(bounds, first, None if count is None else first + count):
            first, last = int(round(start * sr)), min(frames, int(round(end * sr)))
            try:
                if not held_from <= first <= held_from + len(held):  # the first window, or a gap
                    held_from = max(0, first - int(SEEK_PREROLL_S * sr))
                    f.seek(held_from)
                    held = f.read(first - held_from, dtype="float32", always_2d=True)
                missing = last - (held_from + len(held))
                if missing > 0:
                    held = np.concatenate([held, f.read(missing, dtype="float32", always_2d=True)])
            except Exception as e:
                raise AudioError(f"{self.path}: not readable audio ({_reason(e)})") from None
            held, held_from = held[first - held_from :], first  # windows start ever later
            y = held[: last - first].mean(axis=1)
            if not np.all(np.isfinite(y)):
                raise AudioError(f"{self.path}: contains NaN or infinite samples")
            yield start, end, resample(y, sr, sample_rate)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "AudioFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_windows(path: str | Path, sample_rate: int, segment_s: float, hop_s: float
                 ) -> Iterator[tuple[float, float, np.ndarray]]:
    """Yield (start_s, end_s, mono float32 at sample_rate) per window of one file."""
    with AudioFile(path) as f:
        yield from f.windows(sample_rate, segment_s, hop_s)


class LogMel:
    """Log-Mel in dB, numerically the same as librosa's melspectrogram + power_to_db
    (centred Hann STFT, zero padding; ref=np.max when top_db is set) with librosa's trim,
    computed in NumPy/SciPy without importing librosa (seconds per process)."""

    def __init__(self, fp: FeatureParams, functionals: bool = True, encoder_precision: str = "float32",
                 encoder_device: str | None = None) -> None:
        self.fp = fp
        self.functionals = functionals  # describe() also computes ser.prosody's functionals (a fused model's)
        self.encoder_precision = encoder_precision  # the encoder's (ser.encoder.summary): the labeller's auto
        # None: describe() runs the encoder here (each CPU worker); a device ("cuda"): the encoder
        # runs there, on many clips at once (ser.encoder.run_deferred), and describe_deferred() is
        # what the workers compute
        self.encoder_device = encoder_device
        if functionals and fp.encoder is not None:
            encoder.verify(fp.encoder)  # missing or altered weights: say so now, not in every worker's rows
        self.filterbank = mel_filterbank(fp.sample_rate, fp.n_fft, fp.n_mels, fp.fmin, fp.fmax)
        self.window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(fp.n_fft) / fp.n_fft)).astype(np.float32)

    def _frames(self, y: np.ndarray) -> np.ndarray:
        half = self.fp.n_fft // 2
        padded = np.pad(y, (half, half))
        return np.lib.stride_tricks.sliding_window_view(padded, self.fp.n_fft)[:: self.fp.hop_length]

    def trim(self, y: np.ndarray) -> np.ndarray:
        """Drop leading/trailing frames more than trim_db below the loudest (librosa.effects.trim)."""
        if len(y) == 0:
            return y
        power = (self._frames(y) ** 2).mean(axis=1)
        db = 10 * np.log10(np.maximum(power, 1e-10) / max(power.max(), 1e-10))
        loud = np.flatnonzero(db > -self.fp.trim_db)
        if len(loud) == 0:
            return y[:0]
        start = loud[0] * self.fp.hop_length
        end = min(len(y), (loud[-1] + 1) * self.fp.hop_length)
        return y[start:end]

    def power(self, y: np.ndarray) -> np.ndarray:
        """Power spectrogram (n_frames, n_fft // 2 + 1) of the centred, zero-padded STFT.
        Frames that lie wholly in zeros (the padding to duration_s, a large share of short
        clips) have zero power exactly, so their FFT is skipped. float32 FFT (scipy's pocketfft,
        much faster than NumPy's float32 path), within 1e-6 relative of float64 (tested)."""
        frames = self._frames(y)
        power = np.zeros((len(frames), self.fp.n_fft // 2 + 1), dtype=np.float32)
        nonzero = y != 0
        if not nonzero.any():
            return power
        # argmax of a bool array stops at the first True: the first and last nonzero samples
        start, end = int(nonzero.argmax()), len(y) - 1 - int(nonzero[::-1].argmax())
        # frame i covers samples [i * hop - n_fft // 2, i * hop - n_fft // 2 + n_fft) of y
        hop, half = self.fp.hop_length, self.fp.n_fft // 2
        first = max(0, -(-(start + half - self.fp.n_fft + 1) // hop))  # ceil division
        last = min(len(frames) - 1, (end + half) // hop)
        spectrum = scipy.fft.rfft(frames[first : last + 1] * self.window, axis=1, workers=1)
        power[first : last + 1] = spectrum.real ** 2 + spectrum.imag ** 2
        return power

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """Mono signal at fp.sample_rate -> (n_mels, n_frames) float32 log-Mel in dB."""
        return self.describe(y, with_functionals=False)[0]

    def describe(self, y: np.ndarray, with_functionals: bool | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(log-Mel, functionals) of a mono signal at fp.sample_rate: the CNN's input and the
        linear model's (ser.prosody, of the same trimmed and cropped signal, and the encoder's
        summary; None when with_functionals, by default self.functionals, is off)."""
        db, described, spoken = self._describe(y, with_functionals)
        if described is None or self.fp.encoder is None:
            return db, described
        return db, np.concatenate([described, encoder.summary(self.fp.encoder, spoken, self.fp.sample_rate,
                                                            self.encoder_precision, self.fp.encoder_layers)])

    def describe_deferred(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """describe() for an encoder that runs elsewhere (encoder_device): (log-Mel, the functionals
        without the encoder's summary, the encoder's input; None without functionals or encoder)."""
        db, described, spoken = self._describe(y)
        if described is None or self.fp.encoder is None:
            return db, described, None
        # as an array: it is sent to another process (the one that runs the encoder)
        return db, described, encoder.encoder_input(spoken, self.fp.sample_rate).numpy()

    def _describe(self, y: np.ndarray, with_functionals: bool | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        if self.fp.trim_db is not None:
            y = self.trim(y)
        y = np.asarray(y, dtype=np.float32)
        fixed = fix_length(y, self.fp.n_samples)
        mel = (self.power(fixed) @ self.filterbank.T).T  # frames-major: the faster product order
        db = 10 * np.log10(np.maximum(mel, self.fp.amin))
        if self.fp.top_db is not None:  # librosa's power_to_db(ref=np.max, top_db=top_db)
            db = np.maximum(db - db.max(), -self.fp.top_db)
        db = np.ascontiguousarray(db, dtype=np.float32)
        spoken = fixed if len(y) > self.fp.n_samples else y  # the cropped signal without its padding
        if not (self.functionals if with_functionals is None else with_functionals):
            return db, None, spoken
        return db, prosody.functionals(db, spoken, self.fp.sample_rate, self.fp.floor_db), spoken

    def from_file(self, path: str | Path) -> np.ndarray:
        """Load one file and compute its log-Mel."""
        return self(load_audio(path, self.fp.sample_rate))

    def clip_features(self, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Load one file: (log-Mel, functionals), what the features stage stores."""
        return self.describe(load_audio(path, self.fp.sample_rate))

    def clip_features_deferred(self, path: str | Path) -> tuple[np.ndarray, np.ndarray | None, Any]:
        """Load one file: describe_deferred() of it, for an encoder that runs elsewhere."""
        return self.describe_deferred(load_audio(path, self.fp.sample_rate))


def find_audio_files(root: str | Path) -> list[Path]:
    """All audio files under root (recursive), sorted by path for a stable order."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.split(": ", 1)[-1] if text.startswith("Error opening") else text
