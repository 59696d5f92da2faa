"""What SiT and DiT share as families: counting, surgery, and the checks of a stored config (the
reading of a config from a state dict is transformer_detect.py, the network transformer_net.py).

The two families differ only at the border (sit.py): SiT takes ``tau = 1 - t`` and predicts a
velocity, DiT takes a DDPM step and predicts noise.
"""

from __future__ import annotations

import torch

from cbs_convert.families.base import Family, UnitGroup, WidthKnob, block_indices
from cbs_convert.families.transformer_detect import (
    LATENT_DOWNSAMPLING,
    PUBLISHED_HEADS,
    PUBLISHED_SIZES,
    VAE_CHANNELS,
    VAE_SCALE,
    TransformerDetection,
)
from cbs_convert.families.transformer_net import (
    BLOCK_WIDTH_KEYS,
    FREQUENCY_EMBEDDING_SIZE,
    NUMERICS,
    DiffusionTransformer,
    block_widths,
    reference_guidance,
)


class TransformerFamily(TransformerDetection, Family):
    """Architecture, counting and surgery shared by SiT and DiT."""

    drop_variance = False
    # every block's attention and MLP linears and the adaLN modulations (the blocks' and the final
    # layer's: where time enters); the embedders and the output projection stay shared
    delta_layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
    feature_channel_dim = -1  # tokens x channels
    # the widths (per block too), and the depth when whole blocks are dropped
    pruned_keys = ("hidden_size", "num_heads", "mlp_hidden", "depth", *BLOCK_WIDTH_KEYS.values())

    def feature_taps(self, config):
        return [f"blocks.{i}" for i in range(config["depth"])]

    def feature_channels(self, kept):
        return kept["residual"]  # the residual stream keeps a subset of the teacher's channels

    def removable_blocks(self, config):
        return [f"blocks.{i}" for i in range(config["depth"])]

    def with_depth(self, config, depth):
        if any(key in config for key in BLOCK_WIDTH_KEYS.values()):
            raise ValueError("whole blocks cannot be removed from per-block widths (depth pruning refuses such a source)")
        return {**config, "depth": int(depth)}

    def keep_blocks(self, state_dict, config, kept):
        # every block reads and writes the residual stream at one width, so any subset, renumbered
        # in order, is a network of the same family: a plain checkpoint of a shallower SiT or DiT
        kept = sorted(int(i) for i in kept)
        renumbered = {f"blocks.{old}.": f"blocks.{new}." for new, old in enumerate(kept)}
        out = {}
        for key, value in state_dict.items():
            if not key.startswith("blocks."):
                out[key] = value
                continue
            prefix = key[: key.index(".", len("blocks.")) + 1]
            if prefix in renumbered:
                out[renumbered[prefix] + key[len(prefix):]] = value
        return out, self.with_depth(config, len(kept))

    @classmethod
    def expected_shapes(cls, config):
        with torch.device("meta"):
            model = cls.build(config)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    @classmethod
    def build(cls, config):
        return DiffusionTransformer(config, drop_variance=cls.drop_variance)

    def describe(self, config):
        size = PUBLISHED_SIZES.get((config["depth"], config["hidden_size"]))
        tag = f"{self.name.upper()}-{size.upper()}/{config['patch_size']}" if size else f"{self.name.upper()} (custom)"
        widths = block_widths(config)
        if len(set(widths)) > 1:
            heads = f"{'/'.join(str(h) for h, _ in widths)} heads of {config['head_dim']} by block"
            mlp = f"mlp {'/'.join(str(m) for _, m in widths)}"
        else:
            heads, mlp = f"{config['num_heads']}x{config['head_dim']} heads", f"mlp {config['mlp_hidden']}"
        return (f"{tag}: depth {config['depth']}, width {config['hidden_size']}, {heads}, {mlp}, "
                f"{config['input_size']}px latents of {config['in_channels']} channels")

    def nonofficial_numerics(self, config):
        numerics = config.get("numerics", "official")
        return {} if numerics == "official" else {"numerics": numerics}

    def saved_args(self, config):
        args = {"model": f"{self.name.upper()}-pruned", "num_heads": config["num_heads"]}
        if config["label_rows"]:
            args.update(num_classes=config["num_classes"], class_dropout_prob=config["class_dropout_prob"])
        if config.get("numerics", "official") != "official":
            args["numerics"] = config["numerics"]
        args.update(self._time_args())
        return args

    def _time_args(self):
        return {}

    def recipe_name(self, config):
        size = PUBLISHED_SIZES.get((config["depth"], config["hidden_size"]))
        if size is None or config["num_heads"] != PUBLISHED_HEADS[config["hidden_size"]]:
            return None
        return f"{self.name}_{size}_{config['patch_size']}"

    def sample_shape(self, config):
        return (config["in_channels"], config["input_size"], config["input_size"])

    def data_space(self, config):
        # the published models and anything trained like them work in SD-VAE latents; a model of
        # 1 or 3 channels (the bundled teachers) works on pixels directly
        return "latents" if config["in_channels"] == VAE_CHANNELS else "pixels"

    latent_scale = VAE_SCALE

    def num_classes(self, config):
        return config["num_classes"] if config["label_rows"] else 0

    def null_label(self, config):
        return config["num_classes"] if config["label_rows"] == config["num_classes"] + 1 else None

    def param_count(self, config):
        d, hd = config["hidden_size"], config["head_dim"]
        p, cin = config["patch_size"], config["in_channels"]
        cout = cin * (2 if config["learn_sigma"] else 1)
        tokens = (config["input_size"] // p) ** 2
        blocks = sum((d * 3 * h * hd + 3 * h * hd) + (h * hd * d + d) + (d * m + m) + (m * d + d) + (d * 6 * d + 6 * d)
                     for h, m in block_widths(config))
        embed = tokens * d + (p * p * cin * d + d) + (FREQUENCY_EMBEDDING_SIZE * d + d + d * d + d)
        embed += config["label_rows"] * d
        final = (d * p * p * cout + p * p * cout) + (d * 2 * d + 2 * d)
        return blocks + embed + final

    def forward_flops(self, config):
        d, hd = config["hidden_size"], config["head_dim"]
        p, cin = config["patch_size"], config["in_channels"]
        cout = cin * (2 if config["learn_sigma"] else 1)
        n = (config["input_size"] // p) ** 2
        blocks = sum(n * (d * 3 * h * hd + h * hd * d + 2 * d * m) + 2 * n * n * h * hd + d * 6 * d
                     for h, m in block_widths(config))
        macs = blocks + n * p * p * cin * d + n * d * p * p * cout + d * 2 * d
        macs += FREQUENCY_EMBEDDING_SIZE * d + d * d
        return 2 * macs

    def guided_forward(self, forward, x, native_t, y, cfg_scale):
        return reference_guidance(forward, x, native_t, y, cfg_scale)

    # -- surgery --------------------------------------------------------------------------------
    def width_knobs(self, config):
        def multiple(full):
            return 8 if full >= 256 else 1

        return [
            WidthKnob("num_heads", config["num_heads"], 1),
            WidthKnob("hidden_size", config["hidden_size"], min(8, config["hidden_size"]), multiple(config["hidden_size"])),
            WidthKnob("mlp_hidden", config["mlp_hidden"], 1, multiple(config["mlp_hidden"])),
        ]

    def with_widths(self, config, widths):
        # one width for every block, or for a source that already has widths of its own per block
        # (a blockwise expert pruned again) the same cap on each of them
        out = dict(config)
        out.update({k: int(v) for k, v in widths.items()})
        for knob, key in BLOCK_WIDTH_KEYS.items():
            if key in config and knob in widths:
                capped = [min(int(v), int(widths[knob])) for v in config[key]]
                out[knob] = max(capped)
                out.pop(key)
                if len(set(capped)) > 1:
                    out[key] = capped
        return out

    def block_unit_groups(self, config):
        return {"num_heads": [f"heads.{i}" for i in range(config["depth"])],
                "mlp_hidden": [f"mlp.{i}" for i in range(config["depth"])]}

    def with_block_widths(self, config, widths):
        out = dict(config)
        for knob, per_block in widths.items():
            values = [int(v) for v in per_block]
            if len(values) != config["depth"] or min(values) < 1:
                raise ValueError(f"{knob}: one width of at least 1 per block, {config['depth']} blocks; got {values}")
            # the knob itself holds the widest block, so every source-facing check still bounds it
            out[knob] = max(values)
            out.pop(BLOCK_WIDTH_KEYS[knob], None)
            if len(set(values)) > 1:  # blocks alike are the plain config: a full-width expert stays the source
                out[BLOCK_WIDTH_KEYS[knob]] = values
        return out

    def per_block_widths(self, config):
        return {knob: list(config[key]) for knob, key in BLOCK_WIDTH_KEYS.items() if key in config}

    def unit_groups(self, source, target):
        depth = source["depth"]
        adaln = tuple(f"blocks.{i}.adaLN_modulation.1" for i in range(depth)) + ("final_layer.adaLN_modulation.1",)
        residual_readers = tuple(
            name for i in range(depth) for name in (f"blocks.{i}.attn.qkv", f"blocks.{i}.mlp.fc1")
        ) + ("final_layer.linear",)
        d, d_new = source["hidden_size"], target["hidden_size"]
        # The residual stream, the conditioning vector c and the timestep MLP's inner layer are three
        # different spaces that merely share one width; each gets its own choice of kept channels.
        groups = [
            UnitGroup("residual", d, d_new, residual_readers),
            UnitGroup("condition", d, d_new, adaln),
            UnitGroup("timestep_hidden", d, d_new, ("t_embedder.mlp.2",)),
        ]
        for i, ((heads, mlp), (kept_heads, kept_mlp)) in enumerate(zip(block_widths(source), block_widths(target))):
            groups.append(UnitGroup(f"heads.{i}", heads, kept_heads, (f"blocks.{i}.attn.proj",), source["head_dim"]))
            groups.append(UnitGroup(f"mlp.{i}", mlp, kept_mlp, (f"blocks.{i}.mlp.fc2",)))
        return groups

    def slice_state_dict(self, state_dict, source, kept):
        sd = dict(state_dict)
        d, hd = source["hidden_size"], source["head_dim"]
        r, c, h = kept["residual"], kept["condition"], kept["timestep_hidden"]

        def chunks(index, width, n):
            return torch.cat([j * width + index for j in range(n)])

        sd["pos_embed"] = sd["pos_embed"][:, :, r]
        sd["x_embedder.proj.weight"] = sd["x_embedder.proj.weight"][r]
        sd["x_embedder.proj.bias"] = sd["x_embedder.proj.bias"][r]
        sd["t_embedder.mlp.0.weight"] = sd["t_embedder.mlp.0.weight"][h]
        sd["t_embedder.mlp.0.bias"] = sd["t_embedder.mlp.0.bias"][h]
        sd["t_embedder.mlp.2.weight"] = sd["t_embedder.mlp.2.weight"][c][:, h]
        sd["t_embedder.mlp.2.bias"] = sd["t_embedder.mlp.2.bias"][c]
        if "y_embedder.embedding_table.weight" in sd:
            sd["y_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"][:, c]
        for i, (source_heads, _) in enumerate(block_widths(source)):
            b = f"blocks.{i}."
            attn = source_heads * hd
            heads = kept[f"heads.{i}"]
            channels = (heads[:, None] * hd + torch.arange(hd)).reshape(-1)
            qkv_rows = chunks(channels, attn, 3)
            sd[b + "attn.qkv.weight"] = sd[b + "attn.qkv.weight"][qkv_rows][:, r]
            sd[b + "attn.qkv.bias"] = sd[b + "attn.qkv.bias"][qkv_rows]
            sd[b + "attn.proj.weight"] = sd[b + "attn.proj.weight"][r][:, channels]
            sd[b + "attn.proj.bias"] = sd[b + "attn.proj.bias"][r]
            m = kept[f"mlp.{i}"]
            sd[b + "mlp.fc1.weight"] = sd[b + "mlp.fc1.weight"][m][:, r]
            sd[b + "mlp.fc1.bias"] = sd[b + "mlp.fc1.bias"][m]
            sd[b + "mlp.fc2.weight"] = sd[b + "mlp.fc2.weight"][r][:, m]
            sd[b + "mlp.fc2.bias"] = sd[b + "mlp.fc2.bias"][r]
            rows = chunks(r, d, 6)
            sd[b + "adaLN_modulation.1.weight"] = sd[b + "adaLN_modulation.1.weight"][rows][:, c]
            sd[b + "adaLN_modulation.1.bias"] = sd[b + "adaLN_modulation.1.bias"][rows]
        sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][:, r]
        rows = chunks(r, d, 2)
        sd["final_layer.adaLN_modulation.1.weight"] = sd["final_layer.adaLN_modulation.1.weight"][rows][:, c]
        sd["final_layer.adaLN_modulation.1.bias"] = sd["final_layer.adaLN_modulation.1.bias"][rows]
        return {k: v.contiguous() for k, v in sd.items()}

    # -- stored configs -------------------------------------------------------------------------
    @classmethod
    def check_config(cls, check, config, field):
        for key in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "head_dim", "mlp_hidden"):
            check.integer(check.get(config, key, f"{field}.{key}", "a whole number from 1"), f"{field}.{key}", low=1)
        classes = check.integer(check.get(config, "num_classes", f"{field}.num_classes", "a whole number"), f"{field}.num_classes")
        rows = check.integer(check.get(config, "label_rows", f"{field}.label_rows", "a whole number"), f"{field}.label_rows")
        if rows not in (0, classes, classes + 1):
            raise check.fail(f"{field}.label_rows", f"0, {classes} or {classes + 1} for {classes} classes", rows)
        check.number(check.get(config, "class_dropout_prob", f"{field}.class_dropout_prob", "a number from 0 to 1"),
                     f"{field}.class_dropout_prob", 0.0, 1.0)
        check.boolean(check.get(config, "learn_sigma", f"{field}.learn_sigma", "true or false"), f"{field}.learn_sigma")
        if config["input_size"] % config["patch_size"]:
            raise check.fail(f"{field}.input_size", f"a multiple of patch_size {config['patch_size']}", config["input_size"])
        if "numerics" in config:
            check.text(config["numerics"], f"{field}.numerics", tuple(NUMERICS))
        for knob, key in BLOCK_WIDTH_KEYS.items():
            if key in config:
                values = check.sequence(config[key], f"{field}.{key}", config["depth"], config["depth"])
                for i, value in enumerate(values):
                    check.integer(value, f"{field}.{key}[{i}]", 1, config[knob])
                if max(values) != config[knob]:
                    raise check.fail(f"{field}.{knob}", f"{max(values)}, the widest block of {key}", config[knob])
        cls.check_time_config(check, config, field)

    @classmethod
    def check_time_config(cls, check, config, field) -> None:
        """The time convention's entries of a stored config (each family its own)."""
        raise NotImplementedError

    @classmethod
    def check_structure(cls, check, config, shapes, field, what):
        depth = len(block_indices(shapes, "blocks"))
        if config["depth"] != depth:
            raise check.fail(f"{field}.depth", f"{depth}, the number of blocks {what} holds", config["depth"])
        embed = shapes.get("x_embedder.proj.weight")
        if embed is None or len(embed) != 4 or embed[0] != config["hidden_size"]:
            raise check.fail(f"{field}.hidden_size", f"the width of {what}'s x_embedder.proj.weight "
                             f"({'absent' if embed is None else embed[0]})", config["hidden_size"])

    def check_args(self, check, config, args):
        # a training script's image size is the input's side, or the image's through the VAE
        if args.get("image_size") is not None:
            side = config["input_size"]
            if int(args["image_size"]) not in (side, LATENT_DOWNSAMPLING * side):
                raise check.fail("image_size", f"{side} (or {LATENT_DOWNSAMPLING * side} through the VAE), the input "
                                 "cbs_convert_config gives", args["image_size"])
