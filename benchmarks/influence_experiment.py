"""Influence-driven mixing vs static mixtures on synthetic sources (see
mixtape.influence.experiment; same as ``mixtape experiment influence``)."""

from __future__ import annotations

import sys

from mixtape.influence.experiment import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
