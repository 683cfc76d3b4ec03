"""The `ser` command: `ser label DIR -o labels.csv` labels recordings, `ser app` serves the page,
`ser cluster-certs DIR` makes a Dask cluster's certificate and key.

Each subcommand's --help tells its options (and, for label, its exit codes)."""
from __future__ import annotations

import sys

USAGE = """usage: ser {label,app,cluster-certs} ...

  ser label INPUT [INPUT ...] -o labels.csv   label audio files or folders with a trained model
  ser app [--model PATH] [--port 7860]        the web page to try the model
  ser cluster-certs DIR                       a TLS certificate and key for a Dask cluster (README)

`ser label --help` and `ser app --help` tell the options."""


def cluster_certs(argv: list[str]) -> int:
    """`ser cluster-certs DIR`: ser.cluster.make_certificates, with its dask options printed."""
    import argparse

    from ser.cluster import make_certificates
    from ser.util import UserError

    parser = argparse.ArgumentParser(prog="ser cluster-certs", description="Make a Dask cluster's TLS certificate "
                                     "and key (a private authority of its own); copy DIR to every machine of the "
                                     "cluster and keep it private: whoever has the key can run code on the workers.")
    parser.add_argument("folder", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        cert, key = make_certificates(args.folder)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {cert} and {key} (readable by you alone); dask options:\n"
          f"  --tls-ca-file {cert} --tls-cert {cert} --tls-key {key}")
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "label":
        from ser.labeller import cli as labeller  # imports no torch: its feature workers may start by fork

        labeller.exit_now(labeller.main(rest))
    elif command == "app":
        from ser import app

        sys.exit(app.main(rest))
    elif command == "cluster-certs":
        sys.exit(cluster_certs(rest))
    elif command in ("-h", "--help"):
        print(USAGE)
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
