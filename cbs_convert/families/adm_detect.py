"""Reading an ADM config from a guided-diffusion state dict.

What the shapes show: model_channels, channel_mult, num_res_blocks, attention resolutions,
learn_sigma, classes, scale-shift norm, resblock_updown. What they do not show, and where it comes
from instead (hints first, then the published flags of the released ImageNet models, else a clear
default or error):

* heads: ``num_head_channels`` 64 for the 64 and 256 (and 512) px models, ``num_heads`` 4 for 128 px;
* qkv order: the 64 px model was trained with ``use_new_attention_order`` ([q | k | v] over all
  heads), the others with the legacy order ([q_h, k_h, v_h] per head);
* beta schedule: cosine for 64 px, linear otherwise; image size: the published models all end at
  8x8, so ``8 * 2**(levels - 1)``.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from cbs_convert.errors import CheckpointError, WarningNote
from cbs_convert.families.adm_layout import ATTENTION_ORDERS, GUIDED_DIFFUSION_NUMERICS, complete_config
from cbs_convert.families.base import check_keys, setting
from cbs_convert.families.ddpm import DIFFUSION_STEPS

#: The released guided-diffusion models: what their weights show, and the flags they were trained
#: with that the weights do not show (head split, qkv order, schedule, image size).
PUBLISHED = {
    "adm_64": dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_res_blocks=3, attention_ds=[2, 4, 8],
                   image_size=64, num_heads=4, num_head_channels=64, attention_order="new", beta_schedule="cosine"),
    "adm_128": dict(model_channels=256, channel_mult=[1, 1, 2, 3, 4], num_res_blocks=2, attention_ds=[4, 8, 16],
                    image_size=128, num_heads=4, num_head_channels=-1, attention_order="legacy", beta_schedule="linear"),
    "adm_256": dict(model_channels=256, channel_mult=[1, 1, 2, 2, 4, 4], num_res_blocks=2, attention_ds=[8, 16, 32],
                    image_size=256, num_heads=4, num_head_channels=64, attention_order="legacy", beta_schedule="linear"),
    "adm_512": dict(model_channels=256, channel_mult=[0.5, 1, 1, 2, 2, 4, 4], num_res_blocks=2, attention_ds=[16, 32, 64],
                    image_size=512, num_heads=4, num_head_channels=64, attention_order="legacy", beta_schedule="linear"),
}
_SHAPE_FACTS = ("model_channels", "channel_mult", "num_res_blocks", "attention_ds")
HIDDEN_FACTS = ("num_heads", "num_head_channels", "attention_order")


def _unconfirmed(what: str, origin: str) -> str:
    """A head split from the checkpoint's args is a claim the weights cannot check: warn about it."""
    if origin == "checkpoint args":
        return WarningNote(f"{what} taken from the checkpoint's args, which the weights cannot confirm; "
                           "--num-heads / --num-head-channels override")
    return f"{what} ({origin})"


def published_name(c: Dict[str, Any]) -> Optional[str]:
    for name, facts in PUBLISHED.items():
        if all(c.get(k) == facts[k] for k in _SHAPE_FACTS) and c.get("resblock_updown") and c.get("use_scale_shift_norm"):
            return name
    return None


def _mismatches(state_dict, expected) -> int:
    keys = set(state_dict) ^ set(expected)
    wrong = sum(1 for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k]))
    return len(keys) + wrong


def _block_count(state_dict, section: str) -> int:
    found = [int(m.group(1)) for k in state_dict if (m := re.match(rf"{section}\.(\d+)\.", k))]
    return max(found) + 1 if found else 0


class ADMDetection:
    """The part of the ADM family that reads its config from a state dict (``build``,
    ``expected_shapes`` and ``describe`` are the family's own)."""

    @classmethod
    def matches(cls, state_dict):
        return "input_blocks.0.0.weight" in state_dict and "time_embed.0.weight" in state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict, hints):
        sd = state_dict
        for key in ("input_blocks.0.0.weight", "time_embed.0.weight", "out.2.weight", "input_blocks.1.0.in_layers.2.weight",
                    "input_blocks.1.0.emb_layers.1.weight"):
            if key not in sd:
                raise CheckpointError(f"not a guided-diffusion UNet state dict: missing key {key}")
        notes: List[str] = []
        # The time embedding reads model_channels sinusoid features whatever the channel multipliers.
        model_channels = sd["time_embed.0.weight"].shape[1]
        in_channels = sd["input_blocks.0.0.weight"].shape[1]
        out_channels = sd["out.2.weight"].shape[0]
        if out_channels not in (in_channels, 2 * in_channels):
            raise CheckpointError(
                f"out.2.weight has {out_channels} output channels: not {in_channels} (noise) or "
                f"{2 * in_channels} (noise + variance) for {in_channels} input channels"
            )
        table = sd.get("label_emb.weight")
        num_classes = 0 if table is None else int(table.shape[0])
        given_classes, origin = setting(hints, "num_classes")
        if given_classes is not None and int(given_classes) != num_classes:
            flag = "--num-classes" if origin == "given" else "the checkpoint's args (num_classes)"
            raise CheckpointError(f"{flag} says {given_classes} classes, but label_emb has {num_classes} rows (ADM keeps no null row)")
        inner = sd["input_blocks.1.0.in_layers.2.weight"].shape[0]
        emb_rows = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
        if emb_rows not in (inner, 2 * inner):
            raise CheckpointError(f"input_blocks.1.0.emb_layers.1.weight has {emb_rows} rows for {inner} channels")
        base = {
            "in_channels": int(in_channels), "model_channels": int(model_channels), "out_channels": int(out_channels),
            "num_classes": num_classes, "use_scale_shift_norm": emb_rows == 2 * inner,
            # Heads do not change shapes: one head per block while the layout is being found.
            "num_heads": 1, "num_head_channels": -1, "num_heads_upsample": -1,
        }
        structure = cls._find_structure(sd, base)
        base.update(structure)
        published = published_name(base)
        facts = PUBLISHED.get(published, {})
        tag = f"published layout {published.upper().replace('_', '-')}" if published else None
        base.update(cls._hidden_facts(hints, facts, tag, notes))
        numerics = {k: hints[f"args_{k}"] for k in GUIDED_DIFFUSION_NUMERICS if hints.get(f"args_{k}") is not None}
        if numerics and numerics != {k: GUIDED_DIFFUSION_NUMERICS[k] for k in numerics}:
            base.update(numerics)
            notes.append("numerics of the original DDPM UNet: " + ", ".join(f"{k} {v}" for k, v in sorted(numerics.items())))
        levels = len(base["channel_mult"])
        image_size, origin = setting(hints, "image_size")
        if image_size:
            base["image_size"] = int(image_size)
            notes.append(f"image size {base['image_size']} ({origin})")
        elif facts:
            base["image_size"] = facts["image_size"]
            notes.append(f"image size {base['image_size']} ({tag})")
        else:
            base["image_size"] = 8 * 2 ** (levels - 1)
            notes.append(WarningNote(
                f"image size {base['image_size']} ASSUMED (not in the weights, nor in the file's args; the published "
                "models all end at 8x8); pass --image-size to change it"
            ))
        try:
            config = complete_config(base)
            expected = cls.expected_shapes(config)
        except ValueError as exc:
            raise CheckpointError(f"ADM checkpoint: {exc}; check the head settings (--num-heads)") from None
        check_keys(sd, expected, "ADM checkpoint does not match its own widths")
        notes.insert(0, cls(config).describe(config))
        return config, notes

    @classmethod
    def _find_structure(cls, sd, base) -> Dict[str, Any]:
        """num_res_blocks, channel_mult, attention resolutions and resampling kind from the keys.

        Every num_res_blocks that divides the output-block count is tried; the layout whose expected
        shapes match the state dict exactly is the one (resampling ResBlocks look like plain ones, so
        the key names alone cannot decide)."""
        n_out = _block_count(sd, "output_blocks")
        if n_out < 2:
            raise CheckpointError("ADM state dict has no output_blocks; not a guided-diffusion UNet")
        mc = base["model_channels"]
        tried = []
        for nrb in range(1, n_out):
            if n_out % (nrb + 1):
                continue
            levels = n_out // (nrb + 1)
            widths = []
            for level in range(levels):
                key = f"output_blocks.{(levels - 1 - level) * (nrb + 1)}.0.out_layers.3.weight"
                if key not in sd:
                    break
                widths.append(int(sd[key].shape[0]))
            if len(widths) != levels:
                continue
            attention_ds = sorted({
                2 ** ((i - 1) // (nrb + 1))
                for i in range(1, levels * (nrb + 1))
                if (i - 1) % (nrb + 1) < nrb and f"input_blocks.{i}.1.qkv.weight" in sd
            })
            down = f"input_blocks.{nrb + 1}.0."
            structure = {
                "num_res_blocks": nrb,
                "channel_mult": [w // mc if w % mc == 0 else w / mc for w in widths],
                "attention_ds": attention_ds,
                "resblock_updown": levels == 1 or down + "in_layers.2.weight" in sd,
                "conv_resample": down + "op.weight" in sd or levels == 1 or down + "in_layers.2.weight" in sd,
            }
            try:
                expected = cls.expected_shapes(complete_config({**base, **structure}))
            except ValueError:
                continue
            tried.append((_mismatches(sd, expected), nrb, structure, expected))
            if tried[-1][0] == 0:
                return structure
        if not tried:
            raise CheckpointError(f"ADM state dict: {n_out} output blocks fit no guided-diffusion UNet layout")
        _, nrb, _, expected = min(tried, key=lambda item: item[0])
        check_keys(sd, expected, f"ADM state dict fits no UNet layout (closest: {nrb} res blocks per level)")
        raise AssertionError("unreachable: check_keys accepted a layout with mismatches")

    @classmethod
    def _hidden_facts(cls, hints, facts, tag, notes) -> Dict[str, Any]:
        out = {}
        head_channels, head_channels_origin = setting(hints, "num_head_channels")
        heads, heads_origin = setting(hints, "num_heads")
        if head_channels:
            out.update(num_head_channels=int(head_channels), num_heads=-1)
            notes.append(_unconfirmed(f"{out['num_head_channels']} channels per attention head", head_channels_origin))
        elif heads:
            out.update(num_heads=int(heads), num_head_channels=-1)
            notes.append(_unconfirmed(f"{out['num_heads']} attention heads per block", heads_origin))
        elif facts:
            out.update(num_heads=facts["num_heads"], num_head_channels=facts["num_head_channels"])
            split = (f"{facts['num_head_channels']} channels per head" if facts["num_head_channels"] > 0
                     else f"{facts['num_heads']} heads per block")
            notes.append(f"attention {split} ({tag}'s flags)")
        else:
            raise CheckpointError(
                "cannot infer the attention head split of this ADM UNet from the weights; pass --num-heads N "
                "(or the num_head_channels hint)"
            )
        order, order_origin = setting(hints, "attention_order")
        if order is not None:
            order = str(order).lower()
            if order not in ATTENTION_ORDERS:
                raise CheckpointError(f"attention_order {order!r} is unknown; use legacy or new")
            out["attention_order"] = order
            notes.append(f"{order} qkv order ({order_origin})")
        elif facts:
            out["attention_order"] = facts["attention_order"]
            notes.append(f"{facts['attention_order']} qkv order ({tag}'s flags)")
        else:
            out["attention_order"] = "legacy"
            notes.append("legacy qkv order ASSUMED (guided-diffusion's default; not visible in the weights)")
        schedule, origin = setting(hints, "beta_schedule")
        if schedule:
            schedule = str(schedule).lower()
            source = origin
        else:
            schedule, source = facts.get("beta_schedule", "linear"), (f"{tag}'s flags" if facts else "default; --beta-schedule to change")
        if schedule not in ("linear", "cosine"):
            raise CheckpointError(f"beta schedule {schedule!r} is not supported; use linear or cosine")
        out.update(beta_schedule=schedule, diffusion_steps=DIFFUSION_STEPS)
        notes.append(f"{schedule} beta schedule, {DIFFUSION_STEPS} steps, noise prediction ({source})")
        if hints.get("use_checkpoint"):
            out["use_checkpoint"] = True
        return out
