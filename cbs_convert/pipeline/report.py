"""The conversion report: JSON for machines, Markdown for people, a PNG of the profile when
matplotlib is installed (an optional extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from cbs_convert.storage.files import atomic_write, atomic_write_json, atomic_write_text


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _error(expert: Dict[str, Any], key: str) -> str:
    """A measured error, or a dash in a profile-only preview where nothing was pruned yet."""
    return f"{expert[key]:.4f}" if expert.get(key) is not None else "–"


def markdown(report: Dict[str, Any]) -> str:
    src, split, ev = report["source"], report["split"], report["evaluation"]
    lines = [
        "# cbs_convert report",
        "",
        f"Source: `{src['path']}` ({src['container']}, {src['dtype']}), sha256 `{src['sha256'][:16]}…`",
        f"Architecture: {src['architecture']}; {_fmt_int(src['params'])} parameters, "
        f"{src['flops'] / 1e9:.3f} GFLOPs per forward step (2 x multiply-adds).",
        "",
        "Assumed or read from the checkpoint:",
        *[f"- {note}" for note in src["assumptions"]],
        "",
        *(["**Warnings** (also printed when the run started):", *[f"- {w}" for w in report["warnings"]], ""]
          if report.get("warnings") else []),
        "## Profile and split",
        "",
    ]
    prof = report.get("profile")
    if prof:
        lines.append(
            f"Monitor driving the cuts: **{split['monitor']}**; grid {len(prof['grid'])} times in "
            f"[{prof['grid'][0]:.3f}, {prof['grid'][-1]:.3f}], {prof['samples_per_point']} samples each, x_t from {prof['source']}."
        )
        lines.append("")
        monitors = list(prof["mean"])
        lines.append("| t | " + " | ".join(f"{m} (± s.e.)" for m in monitors) + " |")
        lines.append("|---|" + "---|" * len(monitors))
        for i, t in enumerate(prof["grid"]):
            cells = [f"{prof['mean'][m][i]:.4g} ± {prof['stderr'][m][i]:.2g}" for m in monitors]
            lines.append(f"| {t:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.extend(f"- {note}" for note in prof.get("notes", []))
    lines.append(f"Split method: **{split['method']}**; boundaries {', '.join(f'{b:.4f}' for b in split['boundaries'])}.")
    guards = split.get("guards") or {}
    if len(guards) > 1:
        lines.append("")
        lines.append("Inner cuts after each guard: " + "; ".join(
            f"{name}: {', '.join(f'{b:.4f}' for b in cuts)}" for name, cuts in guards.items()))
    lines.extend(f"- {note}" for note in split.get("notes", []))
    alternatives = split.get("alternatives") or {}
    if alternatives:
        lines += ["", "Inner cuts of every rule on this profile (same guards; the one used is marked):", "",
                  "| rule | inner cuts |", "|---|---|"]
        chosen = f"cbs:{split['monitor']}" if split["method"] == "cbs" else split["method"]
        for rule, cuts in alternatives.items():
            mark = " **(used)**" if rule == chosen else ""
            lines.append(f"| {rule}{mark} | {', '.join(f'{b:.4f}' for b in cuts[1:-1]) or '–'} |")
    budget = report["budget"]
    lines += [
        "",
        "## Experts",
        "",
        f"Budget {budget['setting']}: {_fmt_int(budget['total'])} parameters in total, achieved {_fmt_int(budget['achieved'])}."
        + _shared_base_line(report.get("shared_base")),
        "",
        "| expert | segment | share | target params | params | deviation | FLOPs vs source | widths | rel. error before | after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, e in enumerate(ev["experts"]):
        widths = ", ".join(f"{n} {v}" for n, v in e["widths"].items())
        if "kept_blocks" in e:
            widths += f"; blocks {', '.join(map(str, e['kept_blocks']))} ({e['block_selector']})"
        lines.append(
            f"| {k} | [{e['segment'][0]:.3f}, {e['segment'][1]:.3f}] | {e['share']:.3f} | {_fmt_int(e['target_params'])} | "
            f"{_fmt_int(e['params'])} | {e['params_vs_target']:+.2%} | {e['flops_vs_source']:.3f} | {widths} | "
            f"{_error(e, 'error_before')} | {_error(e, 'error_after')} |"
        )
    if ev["seams"]:
        lines += ["", "Seams (relative gap between neighbouring experts at their boundary):", ""]
        lines += [f"- t = {s['boundary']:.4f}: {s['before']:.4f} before fine-tuning, {s['after']:.4f} after" for s in ev["seams"]]
    measured_on = report.get("measured_on")
    if measured_on:
        lines += ["", f"Rel. error: {measured_on['error']}.", f"Seam gap: {measured_on['seam']}."]
    lines += _finetune_lines(report.get("finetune"))
    steps = report.get("step_profile")
    if steps:
        lines += ["", f"Sampling steps: the routed file carries the teacher's {steps['monitor']} curve ({steps['times']} times, "
                  f"{steps['samples_per_point']} samples each; {'; '.join(steps['notes'])}), by which `--schedule profile` "
                  "places steps without profiling again."]
    lines += _quality_lines(report.get("sample_quality"))
    work = report.get("workdir")
    if work:
        lines += ["", f"Work directory `{work['path']}`: kept {', '.join(work['kept'])} ({work['kept_bytes'] / 1e6:.1f} MB); "
                  + (f"removed the experts' weights ({work['removable_bytes'] / 1e6:.1f} MB)"
                     if work["removed"] else f"the experts' weights kept ({work['removable_bytes'] / 1e6:.1f} MB, --keep-workdir)")
                  + "."]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()), ""]
    return "\n".join(lines)


def _shared_base_line(shared) -> str:
    if not shared:
        return ""
    return (f" One shared base of {_fmt_int(shared['base_params'])} parameters (the source's architecture); each expert's "
            f"params below are its rank-{shared['rank']} delta on {len(shared['layers'])} layers.")


def _finetune_lines(finetune) -> List[str]:
    if not finetune:
        return []
    settings = finetune["settings"]
    loss = f"`{settings['loss']}`"
    if settings["loss"] == "both" and "distill_weight" in settings:
        loss += f" ({settings['distill_weight']:g} x distill + {settings['data_weight']:g} x data)"
    if settings.get("feature_weight"):
        loss += (f" + {settings['feature_weight']:g} x block features (teacher activations beyond "
                 f"{settings['feature_mask_sigma']:g} std left out)")
    lines = ["", "## Fine-tuning", "",
             (f"{settings['joint_steps']} steps ({settings['steps']} per expert) for the shared base (lr x{settings['base_lr_scale']:g}) and every delta together"
              if settings.get("experts") == "lora" else
              (f"{sum(settings['expert_steps'])} steps shared by segment length ({', '.join(map(str, settings['expert_steps']))})"
               if settings.get("expert_steps") else f"{settings['steps']} steps per expert")
              + (f", after {settings['trunk_steps']} steps of one trunk on all of time that every expert starts from"
                 if settings.get("trunk_steps") and (finetune.get("trunk") or {}).get("trained") else "")) + f", loss {loss}, AdamW "
             f"(weight decay {settings['weight_decay']:g}, gradient clip {settings['grad_clip']:g}), batch "
             f"{settings['batch_size']}, EMA {settings['ema_decay']:g}, "
             + ("times drawn from all of [0, 1], each sample training its own segment's delta"
                if settings.get("experts") == "lora" else f"times drawn from each segment widened by {settings['margin']:g}")
             + f", label dropout {settings['label_dropout']}, bf16 autocast on CUDA: {settings['bf16']}.", ""]
    runs = [(f"expert {k}", expert) for k, expert in enumerate(finetune["experts"])]
    trunk = finetune.get("trunk")
    if trunk is not None:
        blocks = (f"; blocks {', '.join(map(str, trunk['kept_blocks']))} ({trunk['block_selector']})"
                  if "kept_blocks" in trunk else "")
        lines.append(f"- trunk: {trunk['params']:,} parameters, {trunk['architecture']}{blocks}")
        runs.insert(0, ("trunk", trunk))
    for name, run in runs:
        if not run["trained"]:
            lines.append(f"- {name}: not trained (no steps, or a full-width copy under the distillation loss)")
            continue
        ran = run.get("settings")
        if ran:
            schedule = (f"a cosine down to {ran['lr_floor'] * ran['lr']:g}" if ran["lr_schedule"] == "cosine" else "constant")
            lines.append(f"- {name}: lr {ran['lr']:g}, {ran['warmup_steps']} warm-up steps, then {schedule}; "
                         f"EMA {'warmed up from 0' if ran['ema_warmup'] else 'anchored at its start'}")
        if "loss_curve" in run:
            curve = run["loss_curve"]
            shown = curve[:: max(1, len(curve) // 8)][:8] + ([curve[-1]] if len(curve) > 8 else [])
            resumed_at = run.get("resumed_at") or 0
            timed = (f", the {run['steps_run'] - resumed_at} after resuming at step {resumed_at} in {run['seconds'] or 0:.1f} s"
                     if resumed_at else f" in {run['seconds'] or 0:.1f} s")
            lines.append(
                f"- {name}: {run['steps_run']} steps{timed}; loss "
                f"{run['loss_first']:.4g} at the first step, {run['loss_last']:.4g} at the last; curve (step: mean loss) "
                + ", ".join(f"{step}: {loss:.4g}" for step, loss in shown)
            )
    return lines


def _quality_lines(quality) -> List[str]:
    if not quality:
        return []
    if "skipped" in quality:
        return ["", "## Sample quality", "", f"Not measured: {quality['skipped']}"]
    teacher, converted = quality["teacher"], quality["converted"]
    return ["", "## Sample quality", "",
            f"The bundled {quality['dataset']} teacher and this routed model, {quality['samples']} samples each on the same "
            f"noise and labels (Heun, {quality['heun_steps']} steps, sampling seed {quality['sampling_seed']}), scored on "
            f"the bundled classifier's features: FD {teacher['fd']:.3f} (teacher) and {converted['fd']:.3f} (routed), "
            f"ΔFD {quality['delta_fd']:+.3f}; class match {teacher.get('class_match', float('nan')):.3f} and "
            f"{converted.get('class_match', float('nan')):.3f}. One seed: see the README's benchmark for the spread."]


def plot_profile(report: Dict[str, Any], path: Path) -> bool:
    """Draw phi(t) with its standard error, the cuts and the shares; False without matplotlib."""
    try:  # here, not at the top: matplotlib is an optional extra (cbs_convert[plot])
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    prof, split = report.get("profile"), report["split"]
    if not prof:
        return False
    monitors = list(prof["mean"])
    allocation = split.get("allocation") or ""
    # the shares are written on the curve they came from: --allocation mass:MONITOR's, else --monitor's
    share_monitor = allocation.partition(":")[2] if allocation.startswith("mass:") else split.get("monitor")
    fig, axes = plt.subplots(1, len(monitors), figsize=(4.5 * len(monitors), 3.4), squeeze=False)
    for ax, m in zip(axes[0], monitors):
        grid = np.asarray(prof["grid"])
        mean, err = np.asarray(prof["mean"][m]), np.asarray(prof["stderr"][m])
        ax.plot(grid, mean, color="C0", lw=1.8)
        ax.fill_between(grid, mean - 2 * err, mean + 2 * err, color="C0", alpha=0.25, lw=0)
        for b in split["boundaries"][1:-1]:
            ax.axvline(b, color="C3", ls="--", lw=1.2)
        if m == share_monitor:
            for (lo, hi), share in zip(zip(split["boundaries"][:-1], split["boundaries"][1:]), split["shares"]):
                ax.text((lo + hi) / 2, 0.95, f"{share:.2f}", transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8)
        # Log scale when the positive values span decades; zeros (a student that lost nothing, an
        # exact Gaussian) and the lower error band would otherwise pull the axis down without end.
        positive = mean[mean > 0]
        if positive.size and positive.max() / positive.min() > 30:
            ax.set_yscale("log")
            ax.set_ylim(bottom=positive.min() / 3)
        roles = [role for role, yes in (("drives cuts", m == split.get("monitor") and split.get("method") == "cbs"),
                                        ("shares", m == share_monitor and allocation.startswith("mass:")),
                                        ("zero everywhere", not positive.size)) if yes]
        ax.set_title(m + (f" ({', '.join(roles)})" if roles else ""), fontsize=10)
        ax.set_xlabel("t  (0 = data, 1 = noise)")
        ax.set_xlim(0, 1)
    fig.suptitle(f"{report['source']['architecture'].split(':')[0]}: phi(t) ± 2 s.e., cuts and budget shares", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def write_reports(report: Dict[str, Any], output: Path) -> List[Path]:
    stem = Path(str(output).removesuffix(".safetensors"))
    files = []
    json_path = stem.with_name(stem.name + ".report.json")
    atomic_write_json(json_path, report)
    files.append(json_path)
    md_path = stem.with_name(stem.name + ".report.md")
    atomic_write_text(md_path, markdown(report))
    files.append(md_path)
    png_path = stem.with_name(stem.name + ".profile.png")
    if plot_profile(report, png_path):
        files.append(png_path)
    return files
