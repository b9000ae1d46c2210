#!/usr/bin/env python
"""Search benchmark: enrolment throughput (tiny model) and one-query search latency p50/p99 and memory
for galleries of 10k, 100k and 1M random features inserted through the library.

    PYTHONPATH=src python benchmarks/search_bench.py --out search_bench.json [--sizes 10000,100000,1000000]
        [--dim 512] [--queries 200] [--float16-at 1000000] [--workdir /big/tmp]

The 1M gallery file takes about 2.2 GB of disk (float32 features) in --workdir while it runs.
"""
import argparse
import json
from pathlib import Path

from handclip.search.bench import run_search_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=512, help="feature size (CLIP ViT-B/16's projection: 512)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--float16-at", default="1000000",
                        help="sizes also timed with the float16 backend, what runs without faiss ('' for none)")
    parser.add_argument("--enrol-images", type=int, default=128)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    extra = {int(s): ["float16"] for s in args.float16_at.split(",") if s}
    result = run_search_bench(args.out, sizes=sizes, dim=args.dim, queries=args.queries, top=args.top,
                              extra_backends=extra, enrol_images=args.enrol_images, workdir=args.workdir)
    print(json.dumps(result["enrolment"], indent=2))


if __name__ == "__main__":
    main()
