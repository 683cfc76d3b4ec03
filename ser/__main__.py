"""python -m ser label ... / python -m ser app ...: the same as the `ser` command."""
from ser.cli import main

main()
