"""`ser label`: label audio files with a trained model (labels never come from file names).

    ser label INPUT [INPUT ...] -o OUT.csv     # files or folders (recursive); or python -m ser label

One output row per input file, sorted by path; a file that cannot be labelled gets
status `error` and the reason instead of stopping the run (the work: ser.labeller.loop; on a
cluster: ser.labeller.cluster). This module is the command: its options, and one exit code
for every way of ending.
Exit code: 0 all labelled, 1 some files could not be, 2 usage, input or machine error, 3 crash,
130 interrupted (Ctrl-C); only 0 and 1 write the output.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

# the stream first: it imports ser.labeller.workers, which sets what must be set before torch loads
from ser.labeller.stream import FeatureStream
from ser.audio import LogMel
from ser.device import chosen_device, pick_device
from ser.grouping import GROUPINGS, speaker_keys
from ser.labeller.loop import label_rows
from ser.labeller.output import Table, check_output, printable_text, write_table
from ser.labeller.reading import collect_inputs
from ser.labeller.settings import DEFAULT_MODEL, DEFAULTS, PRECISIONS, Settings
from ser.labeller.speakers import NORMALISED_BY, first_pass_paths, normalised_by
from ser.labeller.workers import keep_freed_memory
from ser.modelfile import read_model_info
from ser.util import UserError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES_HELP = """exit codes:
  0    every file labelled
  1    some files could not be labelled (their rows say why); the output is written
  2    usage, input or machine error (bad option, missing input or model, unsafe or unwritable
       output, a full disk, altered encoder weights, a cluster that refuses or is lost): one line
  3    the labeller crashed (a bug: the traceback is printed); nothing written
  130  interrupted (Ctrl-C); nothing written, a previous output is left as it was
"""


def run(inputs: list[str], out: str, model_path: str, settings: Settings, device_name: str,
        segments_out: str | None = None, speakers: str = "all", cluster: str | None = None,
        cluster_certs: str | None = None, insecure_cluster: bool = False) -> int:
    keep_freed_memory()  # for the model's activations here, and inherited by forked workers
    manifest = [] if speakers in GROUPINGS else [speakers]
    for output in [out] + ([segments_out] if segments_out else []):
        check_output(output, inputs, model_path, keep=manifest)
    if segments_out and Path(segments_out).resolve() == Path(out).resolve():
        raise UserError(f"--segments {segments_out}: is the same file as -o; give another name")
    if cluster:  # a bad address, or an unauthenticated one beyond this machine: before any work
        from ser.cluster import check_address

        check_address(cluster, cluster_certs, insecure_cluster)
    paths = collect_inputs(inputs)
    groups = speaker_keys(paths, speakers)  # a bad grouping or manifest stops here, before any work
    if cluster:
        from ser.labeller.cluster import label_files_on_cluster

        files, segments, used = label_files_on_cluster(paths, model_path, settings, device_name, speakers, groups,
                                                       cluster, cluster_certs, insecure_cluster)
        softened = (read_model_info(model_path) or {}).get("unseen_temperature", 1.0) if settings.soften else 1.0
        return write_outputs(files, segments, out, segments_out, used, settings.uncertain_below, softened)
    info = read_model_info(model_path)
    # Feature workers start before torch is imported; None: the checked load below says why
    first = first_pass_paths(paths, info["normalisation"], speakers, groups, settings) if info else None
    device = chosen_device(device_name)  # imports torch only where an NVIDIA GPU is there
    extractor = (LogMel(info["feature_params"], functionals=info["fused"], encoder_precision=settings.precision,
                        encoder_device=None if device == "cpu" else device) if info else None)
    stream = FeatureStream(paths if first is None else first, extractor, settings,
                           then=None if first is None else paths) if info else None
    try:
        from ser.models import ModelFileError
        from ser.trained import TrainedModel

        try:
            trained = TrainedModel.load(model_path, pick_device(device))
        except ModelFileError as e:
            raise UserError(str(e)) from None
        if info is not None and (info["feature_params"] != trained.feature_params or info["classes"] != trained.classes):
            raise UserError(f"{model_path}: the file's metadata reads differently with and without torch")
        files, segments = label_rows(paths, trained, settings, stream, speakers)
    except BaseException:
        if stream is not None:
            stream.close_passes(kill=True)  # an interrupt or an error: stop the workers now
        raise
    if stream is not None:
        stream.close_passes()
    return write_outputs(files, segments, out, segments_out,
                         normalised_by(trained.normalisation, trained.population is not None, speakers),
                         settings.uncertain_below, trained.unseen_temperature if settings.soften else 1.0)


def write_outputs(files: Table, segments: Table, out: str, segments_out: str | None, used: str,
                  uncertain_below: float, softened: float = 1.0) -> int:
    """Write the labels (and segments), report, and return the exit code."""
    try:
        write_table(files, out)
        if segments_out:
            write_table(segments, segments_out)
    except OSError as e:  # a full disk, a folder gone read-only: the temp file is removed, the old output kept
        raise UserError(f"cannot write {printable_text(str(e.filename or out))} ({e.strerror or e}); "
                        "nothing half-written was kept") from None
    errors = [row["error"] for row in files.rows if row["status"] == "error"]
    print(f"predict: {len(files.rows) - len(errors)} of {len(files.rows)} files labelled -> {printable_text(out)}")
    print(f"predict: {NORMALISED_BY[used]} (column normalised_by)")
    adapted = [row for row in files.rows if row.get("adapted")]
    if adapted:
        print(f"predict: the model adapted to the speaker group of {len(adapted)} files (column adapted)")
    if softened != 1.0:
        print(f"predict: probabilities softened for corpora the model never heard (temperature {softened:.2f}; "
              "--no-soften: as calibrated on its training corpora's held-out speakers)")
    uncertain = sum(1 for row in files.rows if row.get("uncertain"))
    print(f"predict: {uncertain} of {len(files.rows) - len(errors)} labels flagged uncertain (confidence below "
          f"{uncertain_below:g}; column uncertain)")
    for error in errors:
        print(f"  error: {printable_text(error)}", file=sys.stderr)
    return EXIT_SOME_FAILED if errors else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = DEFAULTS
    parser = argparse.ArgumentParser(prog="ser label", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    parser.add_argument("-o", "--output", required=True, help="CSV, or Parquet if it ends in .parquet; "
                        "never a directory or an input")
    parser.add_argument("--segments", help="also write one row per analysis window (start_s, end_s, probabilities)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s (what `make repro` trains)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--jobs", type=int, default=d.n_jobs, help="worker processes (-1: all cores)")
    parser.add_argument("--segment-s", type=float, default=d.segment_s)
    parser.add_argument("--hop-s", type=float, default=d.hop_s)
    parser.add_argument("--max-duration-s", type=float, default=d.max_duration_s,
                        help="longer files get an error row, judged from their header (default %(default)s)")
    parser.add_argument("--uncertain-below", type=float, default=d.uncertain_below,
                        help="a file label less confident than this is flagged uncertain (default %(default)s: "
                        "with the model's calibrated probabilities, more likely wrong than right)")
    parser.add_argument("--speakers", default="all", metavar="all|none|file|folder|MANIFEST",
                        help="which files share a speaker, for a speaker-normalised model: all (every file of the "
                        "run as one group), none (the average training speaker), file (one speaker per file), "
                        "folder (one per sub-folder), or a .csv/.parquet with path and speaker columns; a group "
                        "too small (--min-group-windows) is heard relative to the average training speaker "
                        "(default: %(default)s)")
    parser.add_argument("--min-group-windows", type=int, default=d.min_group_windows,
                        help="a speaker group with fewer windows is heard relative to the average training speaker "
                        "(default %(default)s)")
    parser.add_argument("--max-group-files", type=int, default=d.max_group_files,
                        help="a group's statistics come from a seeded sample of at most this many of its files "
                        "(default %(default)s)")
    parser.add_argument("--adapt", action=argparse.BooleanOptionalAction, default=d.adapt,
                        help="adapt the model to each speaker group's windows before labelling them (test-time "
                        "adaptation, no labels; assumes a group holds several emotions; default: %(default)s)")
    parser.add_argument("--soften", action=argparse.BooleanOptionalAction, default=d.soften,
                        help="soften the probabilities by the model's unseen-corpus temperature, so that they are "
                        "honest on recordings from corpora it never heard; --no-soften: as calibrated on held-out "
                        "speakers of its training corpora (default: %(default)s)")
    parser.add_argument("--cluster", metavar="tls://HOST:PORT", help="label on this Dask scheduler's workers "
                        "(they read the audio at the same paths; the model is sent to them); tcp:// only on "
                        "127.0.0.1 unless --insecure-cluster")
    parser.add_argument("--cluster-certs", metavar="DIR", help="the cluster's certificate and key, made by "
                        "`ser cluster-certs DIR` (needed for tls://)")
    parser.add_argument("--insecure-cluster", action="store_true", help="allow a tcp:// scheduler beyond this "
                        "machine: whoever reaches it runs code on its workers")
    parser.add_argument("--device", default="auto", help="auto: CUDA when present, else CPU")
    parser.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                        help="auto: bfloat16 on CPUs with native units; elsewhere the encoder in int8 and the "
                        "model in float32 (each the faster there); float32: the features stage's arithmetic")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(d, batch_size=args.batch_size, n_jobs=args.jobs, segment_s=args.segment_s,
                                   hop_s=args.hop_s, precision=args.precision, max_duration_s=args.max_duration_s,
                                   uncertain_below=args.uncertain_below, min_group_windows=args.min_group_windows,
                                   max_group_files=args.max_group_files, adapt=args.adapt, soften=args.soften)
    try:
        settings.checked()
    except UserError as e:
        parser.error(str(e).replace("_", "-"))
    return run_safely(args.inputs, args.output, args.model, settings, args.device, args.segments, args.speakers,
                      args.cluster, args.cluster_certs, args.insecure_cluster)


def run_safely(inputs: list[str], out: str, model_path: str, settings: Settings, device_name: str,
               segments_out: str | None = None, speakers: str = "all", cluster: str | None = None,
               cluster_certs: str | None = None, insecure_cluster: bool = False) -> int:
    """run(), with every way of ending as its documented exit code and one clear message."""
    try:
        return run(inputs, out, model_path, settings, device_name, segments_out, speakers, cluster, cluster_certs,
                   insecure_cluster)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\ninterrupted: nothing written ({out} is as it was)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        print(f"error: the labeller crashed (exit {EXIT_CRASH}); nothing written. Please report the traceback above.",
              file=sys.stderr)
        return EXIT_CRASH


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown, which takes 0.5-1.5 s once torch is loaded
    (it frees torch's thousands of modules one by one): a tenth of labelling 1,200 clips.
    Safe here because every output is written, renamed and closed and the workers are shut
    down before main() returns; only the standard streams still hold buffered text."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
