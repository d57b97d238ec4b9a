"""This module makes `python -m artscale` the `artscale` command."""

from artscale.cli import main

main()
