"""Side-by-side speed table of mixtape vs its peers: a thin wrapper over ``mixtape bench``.

    python benchmarks/compare.py [--quick] [--cases pad-ragged,...] [--json results.json]
"""

from __future__ import annotations

import sys

from mixtape.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
