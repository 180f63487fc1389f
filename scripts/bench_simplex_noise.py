"""Benchmark: 3D multi-octave simplex noise on a full 160x224x160 volume (AnoDDPM uses it for every training step).

    .venv/bin/python scripts/bench_simplex_noise.py [--repeats 3] [--octaves 6]

Prints the median time; the target is a few seconds on 2 CPU cores (so it never dominates a training step).
"""

import argparse
import statistics
import time

import torch

from meddiff3d.diffusion.noise import simplex_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--octaves", type=int, default=6)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 224, 160))
    args = parser.parse_args()
    times = []
    for seed in range(args.repeats):
        start = time.perf_counter()
        simplex_noise((1, 1, *args.shape), octaves=args.octaves, generator=seed)
        times.append(time.perf_counter() - start)
    print(f"simplex noise {'x'.join(map(str, args.shape))}, {args.octaves} octaves, {torch.get_num_threads()} "
          f"threads: median {statistics.median(times):.2f} s over {args.repeats} (min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
