"""Peak memory of packing a ~2 GB memory-mapped dataset (``pack_sequences`` out of core).

    python benchmarks/pack_memory.py [--gb 2] [--trl] [--keep DIR]

Builds an on-disk pre-tokenized dataset (int32 token lists, lognormal lengths around 300, written
shard by shard with ``save_to_disk``) in a temporary folder, then packs it into rows of 4096 in a
fresh subprocess and prints the wall time and the peak memory above the process's baseline:
anonymous (RssAnon, sampled) apart from the file-backed pages of the memory maps (RssFile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from mixtape.bench.pack import build_disk_dataset, measure_in_subprocess


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the token data (GB)")
    parser.add_argument("--trl", action="store_true", help="also run TRL's pack_dataset (slow)")
    parser.add_argument("--keep", metavar="DIR", help="build (or reuse) the dataset in DIR")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or os.path.join(tmp, "data")
        if not os.path.isdir(folder):
            t0 = time.perf_counter()
            build_disk_dataset(folder, args.gb)
            print(f"built {folder} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for peer in ["mixtape", *(["trl"] if args.trl else [])]:
            result = measure_in_subprocess(folder, os.path.join(tmp, f"packed-{peer}.arrow"), peer)
            print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
