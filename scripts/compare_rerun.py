"""Compare reruns of the stored grids with the runs in results/.

Rerun some seeds of a grid into a folder of its own, then compare:

    python -m cl_lib experiment temperature --seeds 0 --threads 1 --out /tmp/rerun
    python scripts/compare_rerun.py /tmp/rerun [--write results/reproduction.json]

Every ``DIR/<grid>.json`` of a registered grid is matched run by run (configuration hash and
seed) with ``results/<grid>.json``; see :func:`cl_lib.experiments.compare_rerun`. ``--write``
stores the comparison and each rerun's provenance. The exit status is 1 when a run lies outside
its stored cell's spread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cl_lib import experiments as ex
from cl_lib.files import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rerun_dir", type=Path, help="folder holding <grid>.json reruns")
    parser.add_argument("--write", type=Path, help="store the comparison as JSON here")
    args = parser.parse_args(argv)
    names = [n for n in ex.EXPERIMENTS if (args.rerun_dir / f"{n}.json").is_file()]
    if not names:
        parser.error(f"rerun_dir {args.rerun_dir} holds no <grid>.json of {list(ex.EXPERIMENTS)}")
    record, outside = {}, 0
    for name in names:
        stored = ex.load_stored(name)
        rerun = ex.load_results(args.rerun_dir / f"{name}.json")
        rows = ex.print_rerun_comparison(stored, rerun)
        outside += sum(not r["within_spread"] for r in rows)
        record[name] = {
            "stored_commit": stored["provenance"]["git_commit"],
            "rerun_provenance": rerun["provenance"],
            "runs": rows,
        }
    if args.write:
        write_json(args.write, record)
        print(f"wrote {args.write}")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
