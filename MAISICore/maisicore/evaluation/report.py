"""The evaluation report: ``report.md``, ``metrics.json`` and PNG plots, and the comparison of two reports.

Plots (matplotlib, Agg): ``fid_planes.png`` (FID per plane and their average, when computed),
``hu_histograms.png`` (HU histograms of real and synthetic CTs inside each QC organ present in the
labels, each normalised to unit area), ``montage.png`` (axial, coronal and sagittal mid-planes of up to
four real and four synthetic CTs, window −1000…1000 HU, label contours).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.volumes import atomic_write, read_json

# The figures of metrics.json's "summary", which `compare` compares:
# name → (where in the full result, True when higher is better)
SUMMARY_KEYS = {
    "fid_2_5d.xy": (("fid_2_5d", "xy"), False),
    "fid_2_5d.yz": (("fid_2_5d", "yz"), False),
    "fid_2_5d.zx": (("fid_2_5d", "zx"), False),
    "fid_2_5d.average": (("fid_2_5d", "average"), False),
    "frd": (("frd", "value"), False),
    "vae.mae_hu": (("vae", "mean_mae_hu"), False),
    "vae.psnr_db": (("vae", "mean_psnr_db"), True),
    "vae.ssim": (("vae", "mean_ssim"), True),
    "fidelity.synthetic_pass_fraction": (("fidelity", "synthetic", "pass_fraction"), True),
    "fidelity.real_pass_fraction": (("fidelity", "real", "pass_fraction"), True),
    "diversity.ms_ssim": (("diversity", "ms_ssim_mean"), False),
}


def summary(result: dict) -> dict:
    """The scalar figures of a result, by ``SUMMARY_KEYS`` name (absent ones left out)."""
    out = {}
    for name, (path, _) in SUMMARY_KEYS.items():
        value = result
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _png_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), suffix=path.suffix)


def _plots(result: dict, histograms: dict, montage: dict, edges: np.ndarray) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..io.preview import render_preview

    plots = {}
    fid = result.get("fid_2_5d")
    if fid:
        figure, axes = plt.subplots(figsize=(5, 3.5))
        names = ["xy", "yz", "zx", "average"]
        axes.bar(names, [fid[n] for n in names], color=["#4c72b0", "#55a868", "#c44e52", "#555555"])
        for x, n in enumerate(names):
            axes.text(x, fid[n], f"{fid[n]:.3g}", ha="center", va="bottom", fontsize=8)
        axes.set_ylabel("FID (lower is closer to real)")
        axes.set_title("2.5D FID per plane")
        figure.tight_layout()
        plots["fid_planes.png"] = _png_bytes(figure)
        plt.close(figure)
    organs = sorted(set(histograms["real"]) | set(histograms["synthetic"]))
    if organs:
        columns = min(3, len(organs))
        rows = math.ceil(len(organs) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
        centres = (edges[:-1] + edges[1:]) / 2
        for index, organ in enumerate(organs):
            ax = axes[index // columns][index % columns]
            for side, colour in (("real", "#4c72b0"), ("synthetic", "#c44e52")):
                counts = histograms[side].get(organ)
                if counts is not None and counts.sum():
                    ax.plot(centres, counts / counts.sum() / np.diff(edges), color=colour,
                            label=f"{side} (n={int(counts.sum())})")
            ax.set_title(organ)
            ax.set_xlabel("HU")
            ax.set_xlim(-1000, 1000)
            ax.legend(fontsize=7)
        for index in range(len(organs), rows * columns):
            axes[index // columns][index % columns].axis("off")
        figure.suptitle("HU inside each organ: real vs synthetic (density)")
        figure.tight_layout()
        plots["hu_histograms.png"] = _png_bytes(figure)
        plt.close(figure)
    tiles = [(f"{side}: {name}", render_preview(ct, None if labels is None else type(ct)(labels, ct.affine)))
             for side in ("real", "synthetic") for name, ct, labels in montage[side]]
    if tiles:
        figure, axes = plt.subplots(len(tiles), 1, figsize=(8, 2.8 * len(tiles)), squeeze=False)
        for ax, (title, image) in zip(axes[:, 0], tiles):
            ax.imshow(image)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        figure.suptitle("mid-planes (axial, coronal, sagittal), −1000…1000 HU")
        figure.tight_layout()
        plots["montage.png"] = _png_bytes(figure)
        plt.close(figure)
    return plots


def markdown(result: dict, plots: list[str]) -> str:
    """``report.md``: the tables of ``result`` and links to the plots."""
    lines = ["# MAISI evaluation", "",
             f"maisicore {result['maisicore']}; metrics: {', '.join(result['metrics'])}; "
             f"{len(result['real'])} real, {len(result['synthetic'])} synthetic CTs.", ""]
    fid = result.get("fid_2_5d")
    if fid:
        s = fid["settings"]
        lines += ["## 2.5D FID", "",
                  f"{s['feature_network']}; {'×'.join(map(str, s['shape']))} voxels at "
                  f"{'×'.join(map(str, s['spacing_mm']))} mm, central {s['center_slices_ratio']:.0%} of the slices.", "",
                  "| plane | FID | real slices | synthetic slices |", "|---|---|---|---|"]
        for plane in ("xy", "yz", "zx"):
            lines.append(f"| {plane} | {_fmt(fid[plane])} | {fid['slices']['real'][plane]} | "
                         f"{fid['slices']['synthetic'][plane]} |")
        lines += [f"| average | {_fmt(fid['average'])} | | |", ""]
    if "frd" in result:
        f = result["frd"]
        lines += ["## FRD", "", f"Fréchet Radiomics Distance ({f['version']}, mask: {f['masks']}): "
                  f"**{_fmt(f['value'])}** (lower is closer to real).", ""]
    vae = result.get("vae")
    if vae:
        tissues = list(vae["cases"][0]["mae_hu_by_tissue"]) if vae["cases"] else []
        lines += ["## VAE reconstruction", "", f"Autoencoder `{vae['weights']}`, exact split encode (posterior "
                  "mean) and decode; MAE in HU, PSNR/SSIM on the [0, 1] scale.", "",
                  "| case | MAE HU | " + " | ".join(f"MAE {t}" for t in tissues) + " | PSNR dB | SSIM |",
                  "|---" * (len(tissues) + 4) + "|"]
        for row in vae["cases"]:
            lines.append(f"| {row['case']} | {_fmt(row['mae_hu'], 1)} | "
                         + " | ".join(_fmt(row["mae_hu_by_tissue"][t], 1) for t in tissues)
                         + f" | {_fmt(row['psnr_db'], 2)} | {_fmt(row['ssim'], 4)} |")
        organs = sorted({o for row in vae["cases"] for o in row["mae_hu_by_organ"]})
        if organs:
            lines += ["", "| case | " + " | ".join(f"MAE {o}" for o in organs) + " |", "|---" * (len(organs) + 1) + "|"]
            for row in vae["cases"]:
                lines.append(f"| {row['case']} | " + " | ".join(_fmt(row["mae_hu_by_organ"].get(o), 1) for o in organs)
                             + " |")
        lines.append("")
    for side, block in (result.get("fidelity") or {}).items():
        lines += [f"## Fidelity ({side})", "", "Median HU inside each organ against the range of real CTs "
                  "(`image_median_statistics_ct.json`, as `maisi qc`). "
                  f"Passed {block['passed']} of {block['checked']} ({_fmt(block['pass_fraction'])}).", "",
                  "| case | organ | voxels | median HU | range HU | result |", "|---|---|---|---|---|---|"]
        for case in block["cases"]:
            for row in case["organs"]:
                lines.append(f"| {case['case']} | {row['organ']} | {row['voxels']} | {_fmt(row['median_hu'], 1)} | "
                             f"{row['low_hu']:.1f} … {row['high_hu']:.1f} | {'ok' if row['passed'] else 'OUT'} |")
        lines.append("")
    div = result.get("diversity")
    if div:
        lines += ["## Diversity", "", "MS-SSIM (3D, [0, 1] scale) between CTs of one request with different seeds; "
                  "1 = identical, lower = more diverse.", ""]
        if div["groups"]:
            lines += ["| CTs | pairs | mean MS-SSIM | kernel | scale weights |", "|---|---|---|---|---|"]
            for g in div["groups"]:
                lines.append(f"| {', '.join(g['cases'])} | {g['pairs']} | {_fmt(g['ms_ssim_mean'], 4)} | {g['kernel']} | "
                             f"{', '.join(f'{w:.3f}' for w in g['weights'])} |")
        else:
            lines.append(div["note"])
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def write_report(out: str | os.PathLike, result: dict, histograms: dict, montage: dict, edges: np.ndarray) -> list[Path]:
    """Make ``out`` and write the plots, ``metrics.json`` and ``report.md`` into it (each atomically)."""
    plots = _plots(result, histograms, montage, edges)
    out = Path(out)
    out.mkdir(exist_ok=True)
    written = []
    for name, data in plots.items():
        _write_bytes(out / name, data)
        written.append(out / name)
    _write_bytes(out / "metrics.json", (json.dumps(result, indent=2) + "\n").encode())
    _write_bytes(out / "report.md", markdown(result, list(plots)).encode())
    return written + [out / "metrics.json", out / "report.md"]


def _metrics_of(path: str | os.PathLike, what: str) -> dict:
    path = Path(path)
    file = path / "metrics.json" if path.is_dir() else path
    data = read_json(file, what)
    if not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
        raise InputError(f"{what} {file}: not a `maisi evaluate` metrics.json (no 'summary')")
    return data["summary"]


def compare(a: str | os.PathLike, b: str | os.PathLike) -> tuple[str, list[dict]]:
    """Compare two reports (folders or their metrics.json): a markdown table and its rows
    (metric, a, b, change b − a, verdict: ``better``/``worse``/``same`` for B against A)."""
    first, second = _metrics_of(a, "A"), _metrics_of(b, "B")
    rows = []
    for name, (_, higher_better) in SUMMARY_KEYS.items():
        if name not in first and name not in second:
            continue
        va, vb = first.get(name), second.get(name)
        change = vb - va if va is not None and vb is not None else None
        verdict = None
        if change is not None:
            verdict = "same" if change == 0 else ("better" if (change > 0) == higher_better else "worse")
        rows.append({"metric": name, "a": va, "b": vb, "change": change, "verdict": verdict,
                     "higher_is_better": higher_better})
    lines = [f"# {b} against {a}", "", "| metric | A | B | B − A | B is |", "|---|---|---|---|---|"]
    for r in rows:
        direction = "higher is better" if r["higher_is_better"] else "lower is better"
        if r["metric"] == "diversity.ms_ssim":
            direction = "lower is more diverse"
        lines.append(f"| {r['metric']} ({direction}) | {_fmt(r['a'], 4)} | {_fmt(r['b'], 4)} | "
                     f"{_fmt(r['change'], 4)} | {r['verdict'] or '–'} |")
    return "\n".join(lines) + "\n", rows
