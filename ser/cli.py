"""The `ser` command: `ser label DIR -o labels.csv` labels recordings, `ser app` serves the page.

Each subcommand's --help tells its options (and, for label, its exit codes)."""
from __future__ import annotations

import sys

USAGE = """usage: ser {label,app} ...

  ser label INPUT [INPUT ...] -o labels.csv   label audio files or folders with a trained model
  ser app [--model PATH] [--port 7860]        the web page to try the model

`ser label --help` and `ser app --help` tell the options."""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "label":
        from ser import labeller  # imports no torch: its feature workers may start by fork

        labeller.exit_now(labeller.main(rest))
    elif command == "app":
        from ser import app

        sys.exit(app.main(rest))
    elif command in ("-h", "--help"):
        print(USAGE)
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
