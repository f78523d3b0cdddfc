"""``fusedtx profile --strategy NAME|all``: the high-resolution strategies side by side on one model.

One row per strategy: tokens per image (entering the blocks, averaged over the blocks where merging or
attention-based selection shrinks them), median latency (the strategies timed interleaved, step by step),
images/s, peak memory, ``speedup`` against ``full``, and fidelity against ``full``: the cosine similarity of
the pooled features and the top-1 agreement of the logits over the batch. Writes ``strategies.md`` and a plot
of latency against fidelity (``strategies.png``) in the ``--out`` folder.

The images are a seeded synthetic scene (a smooth background with textured objects), so heuristic selection
has something to find; ``--weights FILE`` loads a trained state_dict (timm checkpoint or safetensors) so the
fidelity columns mean something. With random weights the report says its fidelity is between random-weight
models.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fusedtx import highres

# (label, strategy, settings) of ``--strategy all``; "merge 50% FLOPs" picks r for the image at run time.
ROWS = [
    ("full", "full", {}),
    ("resize", "resize", {}),
    ("tiles", "tiles", {}),
    ("select 25%", "select", {"k": 0.25}),
    ("select 196", "select", {"k": 196}),
    ("select 196 (EViT, attention after block 3)", "select", {"k": 196, "score": "attention", "layer": 3}),
    ("merge 50% FLOPs", "merge", {"flops": 0.5}),
    ("hybrid", "hybrid", {}),
]


def build_model(name: str) -> torch.nn.Module:
    """The model at its native size (so a checkpoint trained there loads), with random weights."""
    if name == "hf_vit":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(image_size=224, num_labels=1000))
    import timm

    return timm.create_model(name, pretrained=False)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """A state_dict from a safetensors file or a torch checkpoint (``state_dict`` / ``model`` / ``state_dict_ema``
    entries unwrapped), loaded strictly."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise SystemExit(f"--weights {path}: does not fit the model: {str(exc)[:400]}") from exc


def scene(batch: int, size: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """Seeded synthetic images: a smooth low-frequency background and a few textured rectangles."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(batch, 3, 8, 8, generator=g), size=(size, size), mode="bicubic",
                        align_corners=False)
    img = low * 0.5
    for b in range(batch):
        for _ in range(6):
            h, w = (int(v) for v in torch.randint(size // 16, size // 4, (2,), generator=g))
            y, x = (int(v) for v in torch.randint(0, size - max(h, w), (2,), generator=g))
            img[b, :, y:y + h, x:x + w] += torch.randn(3, h, w, generator=g) * 0.5
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    return ((img - mean) / 0.226).to(device=device, dtype=dtype)


def mean_tokens(model: highres.HighResModel, size: int) -> float:
    """Tokens per image the blocks see, averaged over the blocks."""
    s, ad = model.settings, model._adapter
    if model.strategy == "merge":
        n = (size // ad.patch_size[0]) * (size // ad.patch_size[1])
        r = s["r"] if s["r"] is not None else highres.r_for_flops(s["flops"], ad.depth, n, ad.num_prefix,
                                                                   ad.embed_dim, ad.mlp_hidden)
        rs, left, total = highres.merge_schedule(r, ad.depth, n), n + ad.num_prefix, 0.0
        for ri in rs:
            total += left - ri / 2  # attention sees left, the MLP left - r
            left -= ri
        return total / ad.depth
    if model.strategy == "select" and s["score"] == "attention":
        n = model.tokens(size, size)
        keep = ad.num_prefix + highres._keep_count(s["k"], n - ad.num_prefix) + 1
        return (n * (s["layer"] + 0.5) + keep * (ad.depth - s["layer"] - 0.5)) / ad.depth
    return float(model.tokens(size, size))  # hybrid: its CNN stem's grid


def label_of(label: str, model: highres.HighResModel, size: int) -> str:
    if model.strategy == "merge" and model.settings["r"] is None:
        ad = model._adapter
        n = (size // ad.patch_size[0]) * (size // ad.patch_size[1])
        r = highres.r_for_flops(model.settings["flops"], ad.depth, n, ad.num_prefix, ad.embed_dim, ad.mlp_hidden)
        return f"{label} (r={r})"
    if model.strategy == "hybrid":
        return f"hybrid ({model.settings['name']})"
    return label


def run(args, device: torch.device, dtype: torch.dtype) -> int:
    from fusedtx.profile import PeakMemory, time_once

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = build_model(args.model)
    if args.weights:
        load_weights(base, args.weights)
    base = base.eval().to(device=device, dtype=dtype)
    wanted = [r for r in ROWS if args.strategy in ("all", r[1])]
    if "full" not in [r[1] for r in wanted]:
        wanted.insert(0, ROWS[0])  # the baseline of speedup and fidelity
    models, skipped = {}, []
    for label, strategy, settings in wanted:
        if strategy != "hybrid" and args.pos != "table":
            settings = {**settings, "pos": args.pos}
        try:
            m = highres.apply(base, strategy, **settings)
            models[label_of(label, m, args.img_size)] = m
        except (ValueError, ImportError, RuntimeError) as exc:
            skipped.append(f"{label}: {exc}")
    images = scene(args.batch, args.img_size, device, dtype)
    peak = PeakMemory(device)
    feats, times, peaks = {}, {label: [] for label in models}, {}
    with torch.inference_mode():
        for label, m in list(models.items()):  # warm-up, which is also the peak-memory and fidelity run
            peak.reset()
            try:
                feats[label] = m.features(images)
            except ValueError as exc:  # a setting this image cannot take (k above its patch count, say)
                if m.strategy == "full":
                    raise
                skipped.append(f"{label}: {exc}")
                del models[label], times[label]
                continue
            peaks[label] = peak.read()
        with tqdm(total=args.steps * len(models), desc="fusedtx profile --strategy", unit="step",
                  file=sys.stderr) as bar:
            for _ in range(args.steps):
                for label, m in models.items():
                    times[label].append(time_once(lambda m=m: m.features(images), device))
                    bar.set_postfix_str(label)
                    bar.update()
    text, points = report(args, device, models, feats, times, peaks, skipped)
    (out_dir / "strategies.md").write_text(text)
    plot(points, out_dir / "strategies.png", args)
    print(text)
    print(f"wrote {out_dir / 'strategies.md'} and {out_dir / 'strategies.png'}")
    return 0


def report(args, device, models, feats, times, peaks, skipped):
    import statistics

    full_label = next(iter(models))
    ref_pooled, ref_logits = feats[full_label]
    full_ms = statistics.median(times[full_label])
    mem = "peak MiB" if device.type == "cuda" else "peak RSS MiB"
    random_note = ("Fidelity is between random-weight models (no --weights given): it shows how far each strategy "
                   "moves the features of an untrained network, not accuracy."
                   if not args.weights else f"Weights: {args.weights}.")
    if args.pos == "sincos":
        random_note += " Position encodings: 2D sin-cos generated from the patch coordinates (--pos sincos)."
    lines = [
        f"# fusedtx profile --strategy {args.strategy}: {args.model} at {args.img_size}x{args.img_size}, "
        f"batch {args.batch}, {args.dtype}",
        "",
        f"Device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; median of {args.steps} "
        "steps, strategies interleaved; images: a seeded synthetic scene. " + random_note,
        "",
        f"| strategy | tokens/image | median ms | images/s | {mem} | speedup | cosine vs full | top-1 vs full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points = []
    for label, m in models.items():
        ms = statistics.median(times[label])
        pooled, logits = feats[label]
        if m.strategy == "hybrid" or pooled.shape != ref_pooled.shape:
            cos, top1 = "n/a (own weights)", "n/a"
        else:
            c = F.cosine_similarity(pooled.float(), ref_pooled.float(), dim=-1).mean().item()
            cos = f"{c:.4f}"
            top1 = "n/a" if logits is None or ref_logits is None else \
                f"{(logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item():.2f}"
            points.append((label, ms, c))
        tokens = f"{mean_tokens(m, args.img_size):.0f}"
        pk = f"{peaks[label]:.0f}" if peaks[label] == peaks[label] else "n/a"
        lines.append(f"| {label} | {tokens} | {ms:.1f} | {1e3 * args.batch / ms:.2f} | {pk} | {full_ms / ms:.2f}x | "
                     f"{cos} | {top1} |")
    lines += ["", "tokens/image: tokens entering the blocks, averaged over the blocks (merging and EViT shrink them "
              "block by block; tiles count every crop)."]
    if skipped:
        lines += ["", "Not run: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n", points


def plot(points, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ms, cos in points:
        ax.scatter(ms, cos)
        ax.annotate(label, (ms, cos), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("median latency (ms, log)")
    ax.set_ylabel("cosine similarity of pooled features vs full")
    ax.set_title(f"{args.model} at {args.img_size}px: latency vs fidelity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
