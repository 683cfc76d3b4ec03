"""Where a labelled file's time goes, one core: each step of the labeller's work per clip, and the
encoder's achieved GFLOP/s against this CPU's roof for the precision it runs in.

    python bench/bench_profile.py [--clips 40] [--precision auto|float32|bfloat16|int8]

Steps per clip, as a feature worker and the model do them: decode + resample, trim + log-Mel, pitch
+ functionals, the encoder (Whisper base), the CNN and the linear model. The roof is measured, not
looked up: the best of a few large matrix products in the encoder's precision on one thread
(what its linear layers are made of), beside the nominal peak from the CPU's flags and clock.
The fast model (no encoder) is the same steps without the encoder. Needs the RAVDESS mirror and,
for the CNN's step, a trained model (make repro) at data/model/model.pt."""
from __future__ import annotations

import argparse
import json
import re
import time
import zipfile
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import threadpoolctl
import torch

from ser import encoder, prosody
from ser.audio import FeatureParams, LogMel, find_audio_files, load_audio
from ser.device import autocast_dtype, encoder_precision
from ser.dsp import fix_length
from ser.fusion import standardise

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared/data/ravdess/Audio_Speech_Actors_01-20_16k.zip"
REPEATS = 3  # each step's time is the best of this many, per clip


def cpu_facts() -> dict:
    """The CPU's name, its units that matter here and its clock (Linux /proc/cpuinfo)."""
    text = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    mhz = max(float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M))
    units = [u for u in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if u in flags]
    # float32 FLOPs a cycle a core: two FMA pipes of 8 (AVX2) or 16 (AVX-512) lanes, x2 for multiply-add.
    # Zen 4 runs AVX-512 on 256-bit pipes, so count AVX-512 as 16 lanes only on Intel.
    intel = "GenuineIntel" in text
    lanes = 16 if "avx512f" in flags and intel else 8
    return {"cpu": re.search(r"^model name\s*:\s*(.*)$", text, re.M).group(1).strip(), "units": units,
            "mhz": mhz, "float32_flops_per_cycle_nominal": 2 * 2 * lanes}


def gemm_roof(dtype: torch.dtype | None, size: int = 1024) -> float:
    """GFLOP/s of the best of a few (size x size) @ (size x size) products on one thread, under
    `dtype` autocast (None: float32; torch.qint8 is measured through a dynamically quantised Linear)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    if dtype == torch.qint8:
        layer = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(size, size)),
                                                       {torch.nn.Linear}, dtype=torch.qint8)

        def step():
            layer(a)
    else:
        def step():
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                a @ b
    step()
    best = min(_timed(step) for _ in range(5))
    return 2 * size**3 / best / 1e9


def _timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def encoder_flops(seconds: float, width: int = 512, layers: int = 6, mels: int = 80) -> float:
    """Multiply-adds x 2 of Whisper base's encoder on `seconds` of audio (100 mel frames a second,
    halved by the second convolution): two convolutions, then per layer the q/k/v and output
    projections (4 n d^2), the feed-forward (8 n d^2) and attention's two products (2 n^2 d)."""
    frames = int(round(100 * seconds))
    n = frames // 2 + frames % 2
    convs = frames * width * mels * 3 + n * width * width * 3
    per_layer = 12 * n * width**2 + 2 * n * n * width
    return 2.0 * (convs + layers * per_layer)


def profile(paths: list[Path], fp: FeatureParams, precision: str, trained) -> dict:
    """Each step's mean milliseconds per clip (the best of REPEATS for each clip), one thread."""
    extractor = LogMel(fp, functionals=False)
    bfloat16 = autocast_dtype(torch.device("cpu"), precision) == torch.bfloat16  # the CNN's
    model = encoder.load(fp.encoder) if fp.encoder else None
    steps: dict[str, list[float]] = {k: [] for k in ("decode_resample", "trim_logmel", "pitch_functionals",
                                                     "encoder", "cnn_and_linear")}
    spoken_s = []
    for path in paths:
        times = {k: [] for k in steps}
        for _ in range(REPEATS):
            start = time.perf_counter()
            y = load_audio(path, fp.sample_rate)
            times["decode_resample"].append(time.perf_counter() - start)
            start = time.perf_counter()
            db = extractor(y)  # the trim, the crop and the log-Mel, as a worker computes them
            times["trim_logmel"].append(time.perf_counter() - start)
            trimmed = np.asarray(extractor.trim(y), dtype=np.float32)  # the signal the functionals hear (untimed)
            fixed = fix_length(trimmed, fp.n_samples)
            spoken = fixed if len(trimmed) > fp.n_samples else trimmed
            start = time.perf_counter()
            described = prosody.functionals(db, spoken, fp.sample_rate, fp.floor_db)
            times["pitch_functionals"].append(time.perf_counter() - start)
            if model is not None:
                start = time.perf_counter()
                summary = encoder.summary(fp.encoder, spoken, fp.sample_rate, precision, fp.encoder_layers)
                times["encoder"].append(time.perf_counter() - start)
                described = np.concatenate([described, summary])
            if trained is not None:
                x = torch.from_numpy(db)[None]
                start = time.perf_counter()
                z = None if trained.head is None else standardise(described[None], *trained.head.population)
                trained.probabilities(x, z, 1, "bfloat16" if bfloat16 else "float32")
                times["cnn_and_linear"].append(time.perf_counter() - start)
        for k in steps:
            if times[k]:
                steps[k].append(min(times[k]))
        spoken_s.append(len(spoken) / fp.sample_rate)
    ms = {k: round(1000 * float(np.mean(v)), 2) for k, v in steps.items() if v}
    return {"ms_per_clip": ms, "spoken_s_mean": round(float(np.mean(spoken_s)), 2),
            "bfloat16": bfloat16, "spoken_s": spoken_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "int8"])
    args = parser.parse_args()
    limit = threadpoolctl.threadpool_limits(1)
    torch.set_num_threads(1)
    model_path = ROOT / "data/model/model.pt"
    trained = None
    if model_path.is_file():
        from ser.trained import TrainedModel

        trained = TrainedModel.load(model_path)
        fp = trained.feature_params
    else:
        import yaml

        p = yaml.safe_load((ROOT / "params.yaml").read_text())["features"]
        fp = FeatureParams.from_dict({k: v for k, v in p.items() if k in FeatureParams.__dataclass_fields__})
    with TemporaryDirectory() as tmp:
        names = sorted(n for n in zipfile.ZipFile(MIRROR).namelist() if n.endswith(".wav"))
        step = max(1, len(names) // args.clips)
        for name in names[::step][: args.clips]:
            zipfile.ZipFile(MIRROR).extract(name, tmp)
        paths = find_audio_files(tmp)
        result = profile(paths, fp, args.precision, trained)
    facts = cpu_facts()
    spoken = result.pop("spoken_s")
    layers = fp.encoder_layers or encoder.LAYERS.get(fp.encoder, 0)
    flops = float(np.mean([encoder_flops(s, layers=layers) for s in spoken])) if fp.encoder else 0.0
    ms = result["ms_per_clip"]
    total = sum(ms.values())
    chosen = encoder_precision(args.precision)
    encoder_dtype = {"int8": torch.qint8, "bfloat16": torch.bfloat16}.get(chosen)
    roof = gemm_roof(encoder_dtype)
    nominal = facts["mhz"] / 1000 * facts["float32_flops_per_cycle_nominal"]  # float32's; the roof is measured
    report = {**facts, "precision": args.precision, "encoder_precision": chosen, "clips": len(paths), **result, "total_ms": round(total, 2),
              "files_per_s_one_core": round(1000 / total, 1),
              "files_per_s_one_core_without_encoder": round(1000 / (total - ms.get("encoder", 0)), 1),
              "not_encoder_share": round(1 - ms.get("encoder", 0) / total, 3)}
    if fp.encoder:
        achieved = flops / (ms["encoder"] / 1000) / 1e9
        report.update(encoder_gflop_per_clip=round(flops / 1e9, 2), encoder_gflops_achieved=round(achieved, 1),
                      gemm_roof_gflops_one_core=round(roof, 1), nominal_float32_peak_gflops_one_core=round(nominal, 1),
                      encoder_share_of_roof=round(achieved / roof, 3))
    del limit
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
