"""How long SAE training waits on its activation store, and what the whole run costs.

    python benchmarks/train_input.py --acts runs/demo/acts [--latents 4096 --k 32 --tokens 2000128]
                                     [--drop-caches]

Trains a TopK SAE from the store exactly as ``saelab train`` does, with ``ActivationStore.batches``
wrapped so that the time the trainer spends in ``next()`` is summed: that is the time training
waited for its input (disk, checksums, window shuffling). Prints it beside the total wall time,
the process's user/system CPU and its peak resident memory. ``--drop-caches`` (root, Linux) empties
the page cache first so that the store is read from disk as after a fresh harvest.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import tempfile
import time

from saelab.store import ActivationStore
from saelab.train import train
from saelab.train_config import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acts", required=True)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2_000_128)
    p.add_argument("--drop-caches", action="store_true")
    args = p.parse_args()
    if args.drop_caches:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")

    real, waited = ActivationStore.batches, [0.0, 0]

    def timed_batches(self, *a, **k):
        it = real(self, *a, **k)
        while True:
            start = time.perf_counter()
            try:
                x = next(it)
            except StopIteration:
                return
            waited[0] += time.perf_counter() - start
            waited[1] += 1
            yield x

    ActivationStore.batches = timed_batches
    out = tempfile.mkdtemp(prefix="saelab-bench-train-")
    try:
        start = time.perf_counter()
        sae = train(ActivationStore.open(args.acts), TrainConfig(architecture="topk", d_sae=args.latents, k=args.k,
                                                                 tokens=args.tokens), out=out + "/sae", progress=False)
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(out)
    use = resource.getrusage(resource.RUSAGE_SELF)
    print(f"total {total:.1f} s, waited for batches {waited[0]:.1f} s over {waited[1]} batches, "
          f"process CPU user {use.ru_utime:.1f} s system {use.ru_stime:.1f} s, peak RSS {use.ru_maxrss / 1024:.0f} MB, "
          f"held-out FVU {sae.provenance.get('held_out', {}).get('fvu', float('nan')):.4f}")


if __name__ == "__main__":
    main()
