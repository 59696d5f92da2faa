"""The batches of ``python -m cbs_convert.sample``: each drawn reproducibly from its own seed, turned
into what a shard stores, and kept as a shard in a folder that a rerun of the same command continues.

Batch b takes its labels and every noise it needs from its own seed (the run's ``--seed`` and b), on
the CPU, so a batch is the same whichever rank, device count or restart draws it. A shard is used
only when it is whole; one cut short or damaged is drawn again.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from cbs_convert.errors import RecipeError, UserError
from cbs_convert.sample.samplers import Guided, draw, to_uint8_nhwc
from cbs_convert.sample.schedules import model_boundaries, parse_scales
from cbs_convert.storage.files import atomic_write, atomic_write_json

SHARD_MARKER = "cbs_convert_samples.json"


def batch_seed(seed: int, batch: int) -> int:
    """One seed per (run seed, batch), well mixed, independent of who draws the batch."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def architecture(family) -> Dict:
    """The family and the settings a model was read as, as JSON stores them: the same bytes read with
    other flags are another model, with another time convention."""
    return {"family": family.name, "config": json.loads(json.dumps(family.config, default=str))}


def draw_batch(family, model, settings: Dict, batch: int, size: int, device, schedule=None):
    """(samples as the family produces them, labels) of one batch, reproducibly; ``schedule`` (a
    ``schedules.Schedule``): the ode sampler's steps."""
    generator = torch.Generator().manual_seed(batch_seed(settings["seed"], batch))
    classes = family.num_classes(family.config)
    labels = None
    if classes:
        if settings["class_label"] is not None:
            labels = torch.full((size,), settings["class_label"], dtype=torch.long)
        else:
            labels = torch.randint(0, classes, (size,), generator=generator)
    noise = torch.randn((size, *family.sample_shape(family.config)), generator=generator)
    forward = guided(family, model, settings)
    clip = {"auto": None, "on": True, "off": False}[settings["clip"]]
    steps = settings["respacing"] or settings["steps"]
    # the uniform schedule without cuts to align to is the sampler's own grid, to the bit
    plain = schedule is None or (schedule.name == "uniform" and not schedule.aligned)
    out = draw(
        family, forward, settings["sampler"], noise.to(device), None if labels is None else labels.to(device),
        steps=steps, generator=generator, method=settings["method"], clip=clip, eta=settings["eta"],
        diffusion_norm=settings["diffusion_norm"], last_step=settings["last_step"], atol=settings["atol"],
        rtol=settings["rtol"], times=None if plain else schedule.times,
        pin_experts=bool(schedule is not None and schedule.aligned),
    )
    return out, labels


def check_guidance_flags(cfg_scale: float, cfg_scale_per_expert: Optional[str]) -> None:
    """What the guidance flags alone can show, before a model loads."""
    if not math.isfinite(cfg_scale):
        raise RecipeError(f"--cfg-scale {cfg_scale}: give a finite number (1: no guidance)")
    if cfg_scale_per_expert is not None:
        parse_scales(cfg_scale_per_expert)
        if cfg_scale != 1.0:
            raise RecipeError("--cfg-scale and --cfg-scale-per-expert both set the guidance; give one of them")


def check_guidance(family, model, settings: Dict) -> None:
    """Refuse guidance or a class the model cannot take: ``settings`` holds ``cfg_scale`` and, when
    given, ``cfg_scale_per_expert`` and ``class_label``."""
    if settings["cfg_scale"] != 1.0 and family.null_label(family.config) is None:
        raise RecipeError(f"--cfg-scale {settings['cfg_scale']:g} needs a class-conditional model with a null class; "
                          "this one has none: drop --cfg-scale")
    scales = settings.get("cfg_scale_per_expert")
    if scales is not None:
        experts = max(len(model_boundaries(model)) - 1, 1)
        if experts == 1:
            raise RecipeError("--cfg-scale-per-expert needs a routed model; this one has one expert: use --cfg-scale")
        if len(scales) != experts:
            raise RecipeError(f"--cfg-scale-per-expert gives {len(scales)} scales; the model has {experts} experts: give "
                              "one each, expert 0 (nearest the data) first")
        if family.null_label(family.config) is None:
            raise RecipeError("--cfg-scale-per-expert needs a class-conditional model with a null class; this one has none")
    label, classes = settings.get("class_label"), family.num_classes(family.config)
    if label is not None and not 0 <= label < max(classes, 1):
        raise RecipeError(f"--class {label}: the model has {classes} classes (0 ... {classes - 1})"
                          if classes else "--class: this model is unconditional; drop --class")


def guided(family, model, settings: Dict):
    """``model`` under the guidance the settings ask for, one scale or one per expert."""
    per_expert = settings.get("cfg_scale_per_expert")
    if per_expert:
        return Guided(family, model, 1.0, per_expert)
    return model if settings["cfg_scale"] == 1.0 else Guided(family, model, settings["cfg_scale"])


class Decoder:
    """Turns a batch of the family's samples into what the shard stores."""

    def __init__(self, family, vae_dir: Optional[str], device):
        self.latent = family.data_space(family.config) == "latents"
        self.vae = None
        if vae_dir and not self.latent:
            raise RecipeError(f"--vae {vae_dir}: this {family.name} model samples pixels, which need no decoder; drop --vae")
        if vae_dir:
            try:  # an optional dependency, needed only to decode latents
                from diffusers.models import AutoencoderKL
            except ImportError:
                raise RecipeError("--vae needs diffusers: pip install 'cbs_convert[diffusers]'") from None
            if not Path(vae_dir).is_dir():
                raise RecipeError(f"--vae {vae_dir} is not a folder; give a local diffusers AutoencoderKL folder "
                                  "(config.json and its weights), e.g. a download of stabilityai/sd-vae-ft-ema")
            try:
                config = json.loads((Path(vae_dir) / "config.json").read_text())
            except (OSError, ValueError):
                config = None
            if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
                kind = f"a {config.get('_class_name')} folder" if isinstance(config, dict) else "a folder without a readable config.json"
                raise RecipeError(f"--vae {vae_dir} is {kind}, not an AutoencoderKL; give the VAE folder "
                                  "(e.g. a download of stabilityai/sd-vae-ft-ema, or a pipeline's vae/ folder)")
            channels = family.sample_shape(family.config)[0]
            if int(config.get("latent_channels", 4)) != channels:
                raise RecipeError(f"--vae {vae_dir} decodes {config.get('latent_channels', 4)}-channel latents; this model "
                                  f"samples {channels} channels: give the VAE it was trained with")
            try:
                self.vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
            except Exception as exc:  # diffusers raises many kinds for a damaged folder
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise RecipeError(f"--vae {vae_dir} is not a readable AutoencoderKL folder: {message[:200]}") from None
            self.scale = family.latent_scale
        self.kind = "latents" if self.latent and self.vae is None else "images"

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor) -> np.ndarray:
        if self.kind == "latents":
            return samples.float().cpu().numpy()
        if self.vae is not None:
            samples = self.vae.decode(samples / self.scale).sample
        return to_uint8_nhwc(samples).cpu().numpy()


def open_shards(shards: Path, settings: Dict, rank: int) -> None:
    """Make the shard folder, or continue one begun by the same command; refuse anything else."""
    marker = shards / SHARD_MARKER
    if marker.exists() and rank == 0:
        for stale in shards.glob(".batch_*.npz.*.partial"):  # a write cut short by a kill: ours to clear
            stale.unlink(missing_ok=True)
    if marker.exists():
        try:
            earlier = json.loads(marker.read_text())
        except (OSError, ValueError):
            raise UserError(f"{marker} is unreadable: delete {shards} to start over") from None
        differs = differing(settings, earlier)
        if not differs:
            return
        if rank != 0:  # rank 0 wrote or checked this marker for this launch: every rank must draw as it does
            raise UserError(f"rank {rank} would sample otherwise than rank 0 ({', '.join(differs)} differ), and the "
                            "shards of one run must agree: the ranks were given different flags or files; launch "
                            "them all with the same")
        drawn = len(list(shards.glob("batch_*.npz")))
        if drawn:
            raise UserError(f"{shards} holds {drawn} batches drawn with other settings ({', '.join(differs)} differ): "
                            f"rerun with those settings to continue, delete {shards} to start over, or choose another --out")
        # an earlier run that stopped before its first batch: there is nothing to keep
        if rank == 0:
            atomic_write_json(marker, settings)
        return
    if shards.exists() and any(shards.iterdir()):
        raise UserError(f"{shards} exists and is not a shard folder of this command: move it or choose another --out")
    if rank == 0:
        atomic_write_json(marker, settings)


def differing(ours: Dict, theirs: Dict) -> List[str]:
    """The keys whose values differ between two settings dicts (a key one lacks counts as None)."""
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))


def shard_path(shards: Path, batch: int) -> Path:
    return shards / f"batch_{batch:06d}.npz"


def write_npz(path: Path, **arrays) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:  # a file object: np.savez would append .npz to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)


def read_shard(path: Path, size: int, conditional: bool, form=None, classes: int = 0) -> Optional[Dict[str, np.ndarray]]:
    """The shard's arrays when it is whole (readable, ``size`` finite samples of the ``form`` a fresh
    batch has, labels when the model is conditional, each one of its ``classes``), else None: a
    shard cut short or damaged is drawn again, never used."""
    try:
        with np.load(path) as shard:
            arrays = {name: shard[name] for name in shard.files}
    except Exception:
        return None
    samples = arrays.get("samples")
    if samples is None or samples.ndim == 0 or len(samples) != size:
        return None
    # shape and dtype before the values: a shard of strings or of another model's size is no batch
    if form is not None and (samples.shape[1:] != tuple(form[0]) or samples.dtype != form[1]):
        return None
    if samples.dtype.kind == "f" and not np.isfinite(samples).all():
        return None
    if conditional:
        labels = arrays.get("labels")
        if labels is None or labels.shape != (size,) or labels.dtype.kind not in "iu":
            return None
        if classes and not ((labels >= 0) & (labels < classes)).all():
            return None
    return arrays


def stored_form(decoder, family, device):
    """(shape, dtype) of one sample as a shard stores it, from the decoder itself on one zero sample."""
    one = decoder(torch.zeros(1, *family.sample_shape(family.config), device=device))
    return one.shape[1:], one.dtype


__all__ = ["Decoder", "SHARD_MARKER", "architecture", "batch_seed", "check_guidance", "check_guidance_flags", "differing",
           "draw_batch", "guided", "open_shards", "read_shard", "shard_path",
           "stored_form", "write_npz"]
