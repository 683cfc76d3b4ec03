"""Stage 6: label audio files with the trained model (labels never come from file names).

    python -m stages.predict INPUT [INPUT ...] -o OUT.csv   # files or folders (recursive)
    python -m stages.predict                                # DVC stage: params.yaml `predict`

One output row per input file, sorted by path; a file that cannot be labelled gets
status `error` and the reason instead of stopping the run. Decoding and features run in
parallel worker processes; inference is batched; only one batch of features is in memory.
Exit code: 0 all labelled, 1 some files could not be, 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from tqdm import tqdm

from stages.audio import AUDIO_EXTENSIONS, AudioError, LogMel, audio_info, load_audio
from stages.models import ModelFileError, infer, load_checkpoint
from stages.util import PARAMS_FILE, UserError, atomic_path, load_params, pick_device


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Audio files under the given files/folders, sorted and unique. Folder entries are
    taken by extension, including broken links and folders with an audio extension, so
    that each gets an error row rather than vanishing."""
    found: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() not in AUDIO_EXTENSIONS:
            found.update(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        elif path.exists() or path.is_symlink():
            found.add(path)
        else:
            raise UserError(f"input not found: {item}")
    return sorted(found, key=lambda p: str(p))


def prepare(path: Path, extractor: LogMel, min_duration_s: float, silence_peak: float
            ) -> tuple[np.ndarray | None, float | None, str]:
    """(features, duration, error) for one file; never raises."""
    try:
        if path.is_symlink() and not path.exists():
            return None, None, f"{path}: broken symbolic link"
        if path.is_dir():
            return None, None, f"{path}: is a directory, not an audio file"
        if not os.access(path, os.R_OK):
            return None, None, f"{path}: permission denied"
        if path.stat().st_size == 0:
            return None, None, f"{path}: empty file (0 bytes)"
        duration = audio_info(path)["duration_s"]
        if duration < min_duration_s:
            return None, duration, f"{path}: too short ({duration:.3f} s < {min_duration_s} s)"
        y = load_audio(path, extractor.fp.sample_rate)
        if np.abs(y).max() < silence_peak:
            return None, duration, f"{path}: silent (peak below {silence_peak})"
        return extractor(y), duration, ""
    except AudioError as e:
        return None, None, str(e)
    except Exception as e:  # one bad file must not stop a batch of thousands
        return None, None, f"{path}: {type(e).__name__}: {e}"


def label_files(paths: list[Path], model: torch.nn.Module, meta: dict[str, Any],
                batch_size: int, n_jobs: int, min_duration_s: float, silence_peak: float,
                device: torch.device) -> pd.DataFrame:
    classes, extractor = meta["classes"], LogMel(meta["feature_params"])
    jobs = (delayed(prepare)(p, extractor, min_duration_s, silence_peak) for p in paths)
    results: Iterator = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        x = torch.from_numpy(np.stack([f for _, f in pending]))
        probs = torch.softmax(infer(model, x, batch_size, device), dim=1).numpy()
        for (row_index, _), prob in zip(pending, probs):
            best = int(prob.argmax())
            rows[row_index].update(
                status="ok", emotion=classes[best], confidence=float(prob[best]),
                **{f"prob_{c}": float(v) for c, v in zip(classes, prob)})
        pending.clear()

    for path, (feature, duration, error) in tqdm(zip(paths, results), total=len(paths),
                                                 desc="predict", unit="file"):
        rows.append({"path": str(path), "status": "error", "error": error, "emotion": None,
                     "confidence": np.nan, **{f"prob_{c}": np.nan for c in classes},
                     "duration_s": duration})
        if feature is not None:
            pending.append((len(rows) - 1, feature))
            if len(pending) == batch_size:
                flush()
    if pending:
        flush()
    columns = ["path", "status", "error", "emotion", "confidence",
               *[f"prob_{c}" for c in classes], "duration_s"]
    return pd.DataFrame(rows, columns=columns)


def write_table(frame: pd.DataFrame, out: str | Path) -> None:
    out = Path(out)
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False, float_format="%.5f")


def run(inputs: list[str], out: str, model_path: str, batch_size: int, n_jobs: int,
        min_duration_s: float, silence_peak: float, device_name: str) -> int:
    device = pick_device(device_name)
    try:
        model, meta = load_checkpoint(model_path, device)
    except ModelFileError as e:
        raise UserError(str(e)) from None
    paths = collect_inputs(inputs)
    frame = label_files(paths, model, meta, batch_size, n_jobs, min_duration_s, silence_peak, device)
    write_table(frame, out)
    failed = int((frame["status"] == "error").sum())
    print(f"predict: {len(frame) - failed} of {len(frame)} files labelled -> {out}")
    for row in frame[frame["status"] == "error"].itertuples():
        print(f"  error: {row.error}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = load_params("predict") if PARAMS_FILE.exists() else {}
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="audio files or folders (default: predict.input_dir)")
    parser.add_argument("-o", "--output", default=p.get("output"), help="CSV or .parquet to write")
    parser.add_argument("--model", default=p.get("model", "data/model/model.pt"))
    parser.add_argument("--batch-size", type=int, default=p.get("batch_size", 64))
    parser.add_argument("--jobs", type=int, default=p.get("n_jobs", -1), help="worker processes (-1: all cores)")
    parser.add_argument("--device", default=p.get("device", "auto"))
    args = parser.parse_args(argv)
    inputs = args.inputs or ([p["input_dir"]] if "input_dir" in p else [])
    if not inputs or not args.output:
        parser.error("give INPUT(s) and -o OUT.csv (or run inside the project for params.yaml defaults)")
    try:
        return run(inputs, args.output, args.model, args.batch_size, args.jobs,
                   p.get("min_duration_s", 0.1), p.get("silence_peak", 1e-4), args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
