"""The smallest total budget that width pruning reaches for each released ADM layout at K experts.

    python benchmarks/adm_budget_floor.py [--k 2]

Residual and skip widths are never pruned; each ResBlock keeps at least one GroupNorm group and each
attention block one head. Nothing is downloaded: the configs are the published flags.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbs_convert.families.adm import ADMFamily  # noqa: E402
from cbs_convert.families.adm_detect import PUBLISHED  # noqa: E402
from cbs_convert.stages.budget import smallest_config  # noqa: E402

LAYOUTS = {"64 cond": ("adm_64", 1000), "128 cond": ("adm_128", 1000), "256 cond": ("adm_256", 1000),
           "256 uncond": ("adm_256", 0)}
KEYS = ("model_channels", "channel_mult", "num_res_blocks", "attention_ds", "num_heads", "num_head_channels",
        "attention_order", "beta_schedule", "image_size")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=2)
    k = parser.parse_args().k
    print(f"| layout | source params | narrowest expert | smallest total at K={k} |")
    print("|---|---|---|---|")
    for name, (published, classes) in LAYOUTS.items():
        config = dict(in_channels=3, out_channels=6, num_classes=classes, **{key: PUBLISHED[published][key] for key in KEYS})
        family = ADMFamily(config)
        full = family.param_count(family.config)
        floor = family.param_count(smallest_config(family, family.config))
        print(f"| {name} | {full:,} | {floor:,} | {k * floor:,} ({k * floor / full:.1%}) |")


if __name__ == "__main__":
    main()
