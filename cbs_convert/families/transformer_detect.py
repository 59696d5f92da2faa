"""Reading a SiT/DiT config from a state dict: what the shapes show (depth, widths, patch, classes,
learn_sigma), and, where they cannot, the published models' head counts or the checkpoint's args.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

from cbs_convert.errors import CheckpointError, WarningNote
from cbs_convert.families.base import check_keys, setting
from cbs_convert.families.transformer_net import NUMERICS

# Published hidden width -> head count (SiT/DiT S, B, L, XL). Head count is invisible in the weights.
PUBLISHED_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
PUBLISHED_SIZES = {(28, 1152): "xl", (24, 1024): "l", (12, 768): "b", (12, 384): "s"}
#: 1000 ImageNet classes and the null row of classifier-free guidance
PUBLISHED_LABEL_ROWS = 1001
#: the SD VAE the published models work in: an image of 8x the latent's side
LATENT_DOWNSAMPLING = 8
#: its latent channels, and the factor the models' training latents were multiplied by
VAE_CHANNELS = 4
VAE_SCALE = 0.18215


def _published_name(model_name):
    """(size, patch) of a published model name such as "SiT-XL/2" or "DiT-B/4"; None otherwise."""
    if not model_name:
        return None
    match = re.fullmatch(r"\s*(?:SiT|DiT)-(S|B|L|XL)/(\d+)\s*", str(model_name), flags=re.IGNORECASE)
    return (match.group(1).lower(), int(match.group(2))) if match else None


class TransformerDetection:
    """The part of the SiT and DiT families that reads their config from a state dict (``expected_shapes``
    is the family's own, ``time_config`` each family's)."""

    @classmethod
    def matches(cls, state_dict):
        return "x_embedder.proj.weight" in state_dict and "blocks.0.attn.qkv.weight" in state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict, hints):
        notes: List[str] = []
        for key in ("x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "t_embedder.mlp.0.weight"):
            if key not in state_dict:
                raise CheckpointError(f"not a {cls.name.upper()} state dict: missing key {key}")
        hidden, in_channels, patch, patch_w = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        grid = int(round(tokens ** 0.5))
        if grid * grid != tokens:
            raise CheckpointError(f"pos_embed has {tokens} tokens, not a square grid; only square inputs are supported")
        depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.attn\.qkv\.weight$", k))})
        if depth == 0:
            raise CheckpointError("no transformer blocks found (blocks.0.attn.qkv.weight missing)")
        attn_dim = state_dict["blocks.0.attn.qkv.weight"].shape[0] // 3
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in state_dict else 0
        named = _published_name(hints.get("args_model"))
        if named is not None:
            size, named_patch = named
            named_depth, named_hidden = next(k for k, v in PUBLISHED_SIZES.items() if v == size)
            if (named_depth, named_hidden, named_patch) != (depth, hidden, patch):
                raise CheckpointError(
                    f"the checkpoint's args name {hints['args_model']} (depth {named_depth}, width {named_hidden}, "
                    f"patch {named_patch}) but its weights have depth {depth}, width {hidden}, patch {patch}: the args "
                    "belong to another model; re-save the weights without them (e.g. as safetensors)"
                )
        heads, origin = setting(hints, "num_heads")
        if heads is not None:
            heads = int(heads)
            published_heads = PUBLISHED_HEADS.get(hidden) if named is not None else None
            if origin == "checkpoint args" and published_heads is not None and heads != published_heads:
                raise CheckpointError(
                    f"the checkpoint's args give {heads} attention heads, but {hints['args_model']} has "
                    f"{published_heads}; pass --num-heads to say which is right"
                )
            if origin in ("given", "model config"):
                notes.append(f"{heads} attention heads ({origin})")
            elif published_heads is not None:
                notes.append(f"{heads} attention heads (checkpoint args, as published for {hints['args_model']})")
            else:
                notes.append(WarningNote(
                    f"{heads} attention heads taken from the checkpoint's args, which the weights cannot confirm "
                    f"(a head count does not show in tensor shapes); --num-heads overrides"
                ))
        elif attn_dim == hidden and hidden in PUBLISHED_HEADS:
            heads = PUBLISHED_HEADS[hidden]
            notes.append(f"{heads} attention heads (published head count for width {hidden})")
        else:
            raise CheckpointError(
                f"cannot infer the attention head count for width {hidden} from the weights; pass --num-heads N"
            )
        if attn_dim % heads:
            raise CheckpointError(f"attention width {attn_dim} is not divisible by {heads} heads; check --num-heads")
        out_features = state_dict["final_layer.linear.weight"].shape[0]
        out_channels = out_features // (patch * patch)
        if out_channels == 2 * in_channels:
            learn_sigma = True
        elif out_channels == in_channels:
            learn_sigma = False
        else:
            raise CheckpointError(
                f"final_layer.linear.weight has {out_features} rows: not {in_channels} or {2 * in_channels} "
                f"channels of patch {patch}x{patch}"
            )
        table = state_dict.get("y_embedder.embedding_table.weight")
        rows = 0 if table is None else table.shape[0]
        num_classes, class_note = cls._read_classes(rows, hints)
        notes.append(class_note)
        image_size, origin = setting(hints, "image_size")
        if origin == "checkpoint args" and int(image_size) not in (grid * patch, LATENT_DOWNSAMPLING * grid * patch):
            raise CheckpointError(
                f"the checkpoint's args give image size {image_size}, but pos_embed holds a {grid * patch}x{grid * patch} "
                f"input (an image of {LATENT_DOWNSAMPLING * grid * patch} through the VAE); the args belong to another model"
            )
        learn_sigma_arg, origin = setting(hints, "learn_sigma")
        config = {
            "input_size": grid * patch,
            "patch_size": patch,
            "in_channels": in_channels,
            "hidden_size": hidden,
            "depth": depth,
            "num_heads": heads,
            "head_dim": attn_dim // heads,
            "mlp_hidden": mlp_hidden,
            "num_classes": num_classes,
            "label_rows": rows,
            "class_dropout_prob": 0.1 if rows == num_classes + 1 and rows else 0.0,
            "learn_sigma": learn_sigma,
        }
        if learn_sigma_arg is not None and bool(learn_sigma_arg) != learn_sigma:
            raise CheckpointError(
                f"the checkpoint's args say learn_sigma={learn_sigma_arg}, but the final layer has "
                f"{out_channels} channels for {in_channels} inputs (learn_sigma={learn_sigma}); the args belong to another model"
            )
        numerics = str(hints.get("args_numerics") or "official")
        if numerics not in NUMERICS:
            raise CheckpointError(f"the checkpoint's args say numerics={numerics!r}; known: {', '.join(NUMERICS)}")
        if numerics != "official":
            config["numerics"] = numerics
            notes.append(f"{numerics} numerics (timestep frequencies and MLP norm as its code computes them)")
        config.update(cls.time_config(hints, notes))
        check_keys(state_dict, cls.expected_shapes(config), f"{cls.name.upper()} checkpoint does not match its own widths")
        return config, notes

    @classmethod
    def _read_classes(cls, rows: int, hints) -> "tuple[int, str]":
        """Real classes in a label table of ``rows`` rows, and how that was decided.

        The reference LabelEmbedder adds a null row for guidance only when it trains with label
        dropout, so N classes give N + 1 rows or N rows. The file decides where it can (the
        classes or the dropout in its args, or the flag); 1001 rows are the published ImageNet
        models. Anything else is an assumption, and said to be one.
        """
        if rows == 0:
            return 0, "unconditional"
        classes, origin = setting(hints, "num_classes")
        dropout = hints.get("args_class_dropout_prob")
        if classes is not None:
            classes = int(classes)
            if rows not in (classes, classes + 1):
                flag = "--num-classes" if origin == "given" else "the checkpoint's args (num_classes)"
                raise CheckpointError(f"{flag} says {classes} classes, but the label table has {rows} rows "
                                      f"(it holds {classes} or {classes + 1} with a null row); fix {flag}")
            how = origin
        elif dropout is not None:
            classes = rows - 1 if float(dropout) > 0 else rows
            how = f"checkpoint args: class_dropout_prob={dropout}"
        elif rows == PUBLISHED_LABEL_ROWS:
            classes, how = rows - 1, "the published ImageNet layout"
        else:
            classes = rows - 1
            return classes, WarningNote(
                f"label table of {rows} rows read as {classes} classes + a null row for guidance: the file does not "
                f"say (the reference code has no null row when trained without label dropout); pass --num-classes {rows} "
                "if every row is a class"
            )
        null = rows == classes + 1
        return classes, f"{classes} classes" + (" + null row for guidance" if null else " (no null row: no guidance)") + f" ({how})"

    @classmethod
    def time_config(cls, hints, notes) -> Dict[str, Any]:
        return {}

