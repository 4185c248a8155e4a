"""EMP on the pixels of real photos (the paper's image experiment).

Scores are pixel deviations |x - mean|; a pruned pixel value is replaced by that mean.  Two
groupings, as in the paper: per RGB channel (one vector per channel, its mean) and per 4x4
patch per channel (one 16-vector per patch and channel, its own mean).  For each beta:
sparsity (fraction of pixel values replaced), PSNR and SSIM (``skimage.metrics``, on the
uint8 result).  Baselines at exactly the same sparsity: random pixels with the same count per
unit (isolates EMP's choice of pixels), and for the patch grouping a uniform count per patch
(top |x - mean| in each patch, total matched: isolates EMP's allocation across patches) and
per-channel top-|x - mean| with the same per-channel counts (a channel-wide allocation).

Images (shipped with scikit-image, no download): ``astronaut`` (512x512) and ``coffee`` (400x600).

    python benchmarks/small_models/image_pixels.py            # full (well under a minute)
    python benchmarks/small_models/image_pixels.py --quick    # smoke run
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

import emprune
from _common import base_parser, command_line, environment, md_table, plt, start, write_json

BETAS_FULL = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
BETAS_QUICK = [0.5, 1.0]
PATCH = 4
PAPER = {"channel": (26.7, 29.4, 0.912), "patch": (32.3, 38.3, 0.991)}  # sparsity %, PSNR dB, SSIM (6000x4000 photo)


def load(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    h, w = (img.shape[0] // PATCH) * PATCH, (img.shape[1] // PATCH) * PATCH
    return np.ascontiguousarray(img[:h, :w, :3])


def to_units(img: np.ndarray, mode: str) -> torch.Tensor:
    """[units, N] float64 view: one row per channel, or per 4x4 patch per channel."""
    x = torch.from_numpy(img).double().permute(2, 0, 1)  # C, H, W
    if mode == "channel":
        return x.reshape(x.shape[0], -1)
    c, h, w = x.shape
    return x.reshape(c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(-1, PATCH * PATCH)


def from_units(rows: torch.Tensor, shape: tuple[int, int, int], mode: str) -> np.ndarray:
    h, w, c = shape
    if mode == "channel":
        x = rows.reshape(c, h, w)
    else:
        x = rows.reshape(c, h // PATCH, w // PATCH, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(c, h, w)
    return np.clip(np.rint(x.permute(1, 2, 0).numpy()), 0, 255).astype(np.uint8)


def apply(img: np.ndarray, mode: str, keep: torch.Tensor) -> tuple[np.ndarray, float]:
    rows = to_units(img, mode)
    mean = rows.mean(1, keepdim=True)
    out = torch.where(keep, rows, mean.expand_as(rows))
    return from_units(out, img.shape, mode), 1.0 - float(keep.double().mean())


def metrics(ref: np.ndarray, out: np.ndarray) -> dict:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(ref, out):
        return {"psnr": float("inf"), "ssim": 1.0}
    return {"psnr": float(peak_signal_noise_ratio(ref, out, data_range=255)),
            "ssim": float(structural_similarity(ref, out, channel_axis=2, data_range=255))}


def emp_keep(img: np.ndarray, mode: str, beta: float) -> torch.Tensor:
    rows = to_units(img, mode)
    scores = (rows - rows.mean(1, keepdim=True)).abs()
    return emprune.keep_mask(scores, beta, dim=1)  # one EMP vector per row (channel / patch-channel)


def main(argv=None) -> int:
    ap = base_parser(__doc__, "image_pixels", "smoke run: astronaut only, 2 betas")
    ap.add_argument("--random-seeds", type=int, default=None, help="seeds for the random baseline (default 3)")
    args = ap.parse_args(argv)
    started = start(args, "image_pixels", lambda out, R: (write_markdown(out, R), plot(out, R, None)))
    if started is None:
        return 0
    log, out = started
    t0 = time.perf_counter()
    betas = BETAS_QUICK if args.quick else BETAS_FULL
    names = ["astronaut"] if args.quick else ["astronaut", "coffee"]
    n_rand = args.random_seeds or (1 if args.quick else 3)
    R: dict = {"command": command_line(), "quick": args.quick, "env": environment(), "betas": betas,
               "patch": PATCH, "random_seeds": list(range(n_rand)), "images": {}}
    gallery = {}
    for name in names:
        img = load(name)
        rows_img = {"shape": list(img.shape), "modes": {}}
        for mode in ("channel", "patch"):
            res = []
            for beta in betas:
                keep = emp_keep(img, mode, beta)
                outimg, sp = apply(img, mode, keep)
                k_unit = keep.sum(1)
                e = {"beta": beta, "sparsity": sp, **metrics(img, outimg),
                     "kept_per_unit": {"min": int(k_unit.min()), "mean": float(k_unit.double().mean()),
                                       "max": int(k_unit.max())}, "baselines": {}}
                n_unit = keep.shape[1]
                if mode == "patch":
                    e["kept_hist"] = torch.bincount(k_unit, minlength=n_unit + 1).tolist()
                # random pixels, same count per unit
                ms = []
                for s in range(n_rand):
                    g = torch.Generator().manual_seed(s)
                    rk = emprune.topk_mask(torch.rand(keep.shape, generator=g, dtype=torch.float64), k_unit, dim=1)
                    o, rsp = apply(img, mode, rk)
                    ms.append(metrics(img, o))
                    if name == "astronaut" and beta == 1.0 and mode == "patch" and s == 0:
                        gallery["random in patch"] = (o, rsp)
                e["baselines"]["random_same_count"] = {
                    "psnr": float(np.mean([m["psnr"] for m in ms])), "ssim": float(np.mean([m["ssim"] for m in ms]))}
                if mode == "patch":
                    rows = to_units(img, mode)
                    sc = (rows - rows.mean(1, keepdim=True)).abs()
                    total = int(keep.sum())
                    q, r = divmod(total, rows.shape[0])
                    ku = torch.full((rows.shape[0],), q, dtype=torch.int64)
                    ku[:r] += 1  # exact same total as EMP
                    uk = emprune.topk_mask(sc, ku, dim=1)
                    uo, usp = apply(img, mode, uk)
                    e["baselines"]["uniform_per_patch"] = {"sparsity": usp, **metrics(img, uo)}
                    # per-channel top-|x - mean_c| with EMP-patch's per-channel counts
                    per_c = keep.reshape(3, -1).sum(1)
                    crow = to_units(img, "channel")
                    ck = emprune.topk_mask((crow - crow.mean(1, keepdim=True)).abs(), per_c, dim=1)
                    o, csp = apply(img, "channel", ck)
                    e["baselines"]["channel_topk"] = {"sparsity": csp, **metrics(img, o)}
                    if name == "astronaut" and beta == 1.0:
                        gallery["uniform per patch"] = (uo, usp)
                if name == "astronaut" and beta == 1.0:
                    gallery[f"EMP per {mode}"] = (outimg, sp)
                res.append(e)
                log(f"{name} {mode:<7} beta={beta:<5g} sparsity {100 * sp:6.2f}%  PSNR {e['psnr']:6.2f} dB  "
                    f"SSIM {e['ssim']:.4f} | " + "  ".join(f"{k} {v['psnr']:.2f}/{v['ssim']:.3f}"
                                                          for k, v in e["baselines"].items()))
            rows_img["modes"][mode] = res
        R["images"][name] = rows_img
    gallery = {"original": (load("astronaut"), 0.0), **gallery}
    R["seconds"] = time.perf_counter() - t0
    write_json(out / "results.json", R)
    write_markdown(out, R)
    plot(out, R, gallery)
    log(f"wrote {out}")
    return 0


def _f(x, nd=2):
    return "inf" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def write_markdown(out: Path, R: dict) -> None:
    L = [f"# EMP on image pixels ({'QUICK smoke run' if R['quick'] else 'full run'})", "",
         f"Command: `{R['command']}`  ", f"Wall time: {R['seconds']:.0f} s (emprune {R['env']['emprune']}).", "",
         "Scores |x - mean|, pruned values set to the mean; per RGB channel (channel mean) and per "
         f"{R['patch']}x{R['patch']} patch per channel (patch mean); `emprune.keep_mask(scores, beta, dim=1)` on the "
         "[units, N] matrix. Sparsity = fraction of pixel values replaced. PSNR (dB) and SSIM from "
         "`skimage.metrics` on the uint8 result (`inf` = identical). Baselines at exactly EMP's sparsity: random "
         f"pixels with EMP's count in every unit (mean of seeds {R['random_seeds']}); for patches also a uniform "
         "count per patch (top |x - mean| per patch, same total) and per-channel top |x - mean_c| with EMP-patch's "
         "per-channel counts. PSNR / SSIM cells: value (dB / -).", ""]
    for name, I in R["images"].items():
        L += [f"## {name} ({I['shape'][1]}x{I['shape'][0]})", ""]
        for mode in ("channel", "patch"):
            hdr = ["beta", "sparsity %", "EMP PSNR", "EMP SSIM", "random same count PSNR / SSIM"]
            if mode == "patch":
                hdr += ["uniform per patch PSNR / SSIM", "per-channel top-k PSNR / SSIM"]
            hdr.append("paper (6000x4000 photo): sparsity / PSNR / SSIM")
            body = []
            for e in I["modes"][mode]:
                b = e["baselines"]
                line = [f"{e['beta']:g}", f"{100 * e['sparsity']:.2f}", _f(e["psnr"]), _f(e["ssim"], 4),
                        f"{_f(b['random_same_count']['psnr'])} / {_f(b['random_same_count']['ssim'], 4)}"]
                if mode == "patch":
                    line += [f"{_f(b[k]['psnr'])} / {_f(b[k]['ssim'], 4)}" for k in ("uniform_per_patch", "channel_topk")]
                p = PAPER[mode]
                line.append(f"{p[0]} / {p[1]} / {p[2]}" if e["beta"] == 1.0 else "")
                body.append(line)
            L += [f"**per {mode}**", "", md_table(hdr, body), ""]
        e1 = next((e for e in I["modes"]["patch"] if e["beta"] == 1.0), None)
        if e1:
            L += [f"Per-patch kept counts at beta = 1 (of 16): min {e1['kept_per_unit']['min']}, mean "
                  f"{e1['kept_per_unit']['mean']:.2f}, max {e1['kept_per_unit']['max']}; histogram (count 0..16): "
                  f"{e1['kept_hist']}.", ""]
    L += ["Plots: `image_sweep.png` (beta vs sparsity; PSNR and SSIM vs sparsity with the baselines and the "
          "paper's points), `image_astronaut.png` (side by side at beta = 1, with a zoomed crop), "
          "`image_patch_counts.png` (how many of 16 values each patch keeps at beta = 1).", ""]
    (out / "results.md").write_text("\n".join(L))


def plot(out: Path, R: dict, gallery: dict | None) -> None:
    p = plt()
    fig, axes = p.subplots(1, 3, figsize=(16, 4.5))
    mk = {"astronaut": "o", "coffee": "s"}
    for name, I in R["images"].items():
        for mode, c in (("channel", "C0"), ("patch", "C1")):
            es = I["modes"][mode]
            axes[0].plot([e["beta"] for e in es], [100 * e["sparsity"] for e in es], "-", marker=mk[name], c=c,
                         label=f"{name}, per {mode}")
            for ax, key in ((axes[1], "psnr"), (axes[2], "ssim")):
                fin = [(100 * e["sparsity"], e[key]) for e in es if e[key] is not None and np.isfinite(e[key]) and e["sparsity"] > 0]
                ax.plot(*zip(*fin), "-", marker=mk[name], c=c, label=f"EMP per {mode} ({name})") if fin else None
                bl = [("random_same_count", "C3", ":", "random, same count per unit")]
                if mode == "patch":
                    bl += [("uniform_per_patch", "C2", "--", "uniform count per patch"),
                           ("channel_topk", "C4", "-.", "per-channel top-k")]
                for bk, bc, bs, bl_ in bl:
                    pts = [(100 * e["sparsity"], e["baselines"][bk][key]) for e in es
                           if e["sparsity"] > 0 and e["baselines"][bk][key] is not None and np.isfinite(e["baselines"][bk][key])]
                    if pts:
                        ax.plot(*zip(*pts), bs, marker=mk[name], mfc="none", c=bc, ms=4,
                                label=f"{bl_} @ EMP-{mode} ({name})")
    for mode, c in (("channel", "C0"), ("patch", "C1")):
        s, ps, ss = PAPER[mode]
        axes[0].plot([1.0], [s], "*", c=c, ms=12, mec="k", label=f"paper per {mode} (beta=1)")
        axes[1].plot([s], [ps], "*", c=c, ms=12, mec="k", label=f"paper per {mode}")
        axes[2].plot([s], [ss], "*", c=c, ms=12, mec="k", label=f"paper per {mode}")
    axes[0].axvline(1, c="grey", ls=":", lw=0.6)
    axes[0].set(xlabel="beta", ylabel="sparsity (%)", title="beta vs sparsity")
    axes[1].set(xlabel="sparsity (%)", ylabel="PSNR (dB)", title="PSNR vs sparsity")
    axes[2].set(xlabel="sparsity (%)", ylabel="SSIM", title="SSIM vs sparsity")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "image_sweep.png", dpi=110)
    p.close(fig)

    I = R["images"].get("astronaut")
    e1 = next((e for e in I["modes"]["patch"] if e["beta"] == 1.0), None) if I else None
    if e1 and "kept_hist" in e1:
        fig, ax = p.subplots(figsize=(7, 3.5))
        ax.bar(range(len(e1["kept_hist"])), e1["kept_hist"], color="C1")
        ax.set(xlabel="values kept of 16 in a 4x4 patch-channel", ylabel="number of patch-channels",
               title=f"astronaut, EMP per patch, beta = 1: sparsity {100 * e1['sparsity']:.1f}%")
        fig.tight_layout()
        fig.savefig(out / "image_patch_counts.png", dpi=110)
        p.close(fig)

    if gallery:
        keys = ["original", "EMP per channel", "EMP per patch", "random in patch", "uniform per patch"]
        keys = [k for k in keys if k in gallery]
        ref = gallery["original"][0]
        fig, axes = p.subplots(2, len(keys), figsize=(3.6 * len(keys), 7.4))
        for j, k in enumerate(keys):
            im, sp = gallery[k]
            m = metrics(ref, im)
            for i, crop in enumerate((np.s_[:, :], np.s_[60:188, 150:278])):
                axes[i, j].imshow(im[crop])
                axes[i, j].set_xticks([])
                axes[i, j].set_yticks([])
            t = k if k == "original" else f"{k}\nsparsity {100 * sp:.1f}%, PSNR {_f(m['psnr'])} dB, SSIM {m['ssim']:.3f}"
            axes[0, j].set_title(t, fontsize=8)
        axes[1, 0].set_ylabel("zoom 128x128")
        fig.suptitle("astronaut, beta = 1 (random / uniform at EMP-patch's sparsity)", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "image_astronaut.png", dpi=72)
        p.close(fig)


if __name__ == "__main__":
    sys.exit(main())
