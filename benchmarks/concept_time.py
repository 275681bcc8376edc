"""Wall time of ``saelab concept`` (selection + screen + calibration) on the Golden Gate texts.

    python benchmarks/concept_time.py RUN [--prompts 8]

The target (issue 22): at most 3 minutes on a quiet 2-core machine for 40 texts and 8 calibration prompts.
Prints each stage's seconds and the load average before and after (timings on a busy machine are not the
machine's speed: read them beside the load).
"""

import argparse
import os
import time

import torch

from saelab.concept import ConceptConfig, calibrate_writers, find_concept, find_writers, judge_of
from saelab.experiments import PROMPTS, load_run
from saelab.texts import read_texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm, sae, db = load_run(args.run)
    pos, neg = read_texts(PROMPTS / "golden_gate_positive.txt"), read_texts(PROMPTS / "golden_gate_negative.txt")
    prompts = read_texts(PROMPTS / "golden_gate_calibration.txt")[:args.prompts]
    cfg = ConceptConfig(keywords=["golden gate", "bridge", "san francisco"])
    print(f"load before: {os.getloadavg()}; {len(pos) + len(neg)} texts, {len(prompts)} calibration prompts")
    t0 = time.perf_counter()
    found = find_concept(lm, sae, pos, neg, cfg, db=db)
    t1 = time.perf_counter()
    writers = find_writers(lm, sae, found, pos, neg, prompts, cfg, chat=True, db=db, calibrate=False)
    t2 = time.perf_counter()
    good = [w["feature"] for w in writers.writers if w["lift"] > cfg.min_lift]

    cal = calibrate_writers(lm, sae, good, prompts, judge_of(found, cfg), cfg, chat=True, db=db)
    t3 = time.perf_counter()
    print(f"ranking {t1 - t0:.1f} s, screen {t2 - t1:.1f} s, calibration {t3 - t2:.1f} s "
          f"({sum(len(s['features']) > 0 for s in cal.search)} (size, mode) tried), total {t3 - t0:.1f} s")
    print(f"dial: {cal.spec.label()} at {cal.strength:g}, reached {cal.reached}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
