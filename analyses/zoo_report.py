"""Rank a trained zoo by validation loss, relative to the unigram baseline.

    python analyses/zoo_report.py zoo/tiny
"""

import sys

from workbench.zoo import collect_existing


def main(zoo_dir: str) -> int:
    results = collect_existing(zoo_dir)
    if not results:
        print(f"no finished runs in {zoo_dir}; train them with `workbench zoo --out {zoo_dir}`", file=sys.stderr)
        return 2
    uni = next(iter(results.values()))["unigram_val_loss"]
    ranked = sorted(results.items(), key=lambda kv: (kv[1]["diverged"], kv[1]["final_val_loss"] or float("inf")))
    print(f"{'rank':<5}{'norm':<11}{'val loss':>9}{'below unigram':>15}")
    for i, (name, r) in enumerate(ranked, 1):
        if r["diverged"]:
            print(f"{i:<5}{name:<11}{'diverged':>9}{'at step ' + str(r['diverged_at_step']):>15}")
        else:
            print(f"{i:<5}{name:<11}{r['final_val_loss']:>9.4f}{uni - r['final_val_loss']:>15.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "zoo/tiny"))
