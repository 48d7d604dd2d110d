"""`python -m fastdiff.train`: train, export and evaluate the default model.

    python -m fastdiff.train all --out runs/default                  # vae, then unet, then export to OUT/model
    python -m fastdiff.train vae --out runs/default [--steps N] [--batch N] [--config tiny|default]
    python -m fastdiff.train unet --out runs/default [--steps N] [--batch N]
    python -m fastdiff.train export --out runs/default [--model-dir DIR]
    python -m fastdiff.train eval [--model DIR] [--n 300] [--guidance 3,5,7.5]   # also: fastdiff eval-default

Every stage resumes from its checkpoint in OUT when one exists, so rerunning a stopped command continues it.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

EXIT_INCOMPLETE = 3  # a stage stopped at --time-limit before its last step; rerun the command to continue


def _recipe(args: argparse.Namespace):
    from .recipe import get_recipe

    overrides = {}
    for stage in ("vae", "unet"):
        for setting in ("steps", "batch"):
            value = getattr(args, f"{stage}_{setting}")
            if value is None and args.command == stage:
                value = getattr(args, setting)
            if value is not None:
                overrides[f"{stage}_{setting}"] = value
    return get_recipe(args.config, **overrides)


def _device(name: Optional[str]) -> torch.device:
    return torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))


def _train(args: argparse.Namespace) -> int:
    from .export import export_model, folder_size
    from .unet import train_unet
    from .vae import train_vae

    if args.command == "all" and (args.steps is not None or args.batch is not None):
        raise SystemExit("fastdiff.train: `all` runs two stages; give --vae-steps/--unet-steps and "
                         "--vae-batch/--unet-batch instead of --steps/--batch")
    recipe, device, out = _recipe(args), _device(args.device), Path(args.out)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = None if args.time_limit is None else time.monotonic() + 60 * args.time_limit
    stages = {"vae": train_vae, "unet": train_unet}
    for name in (("vae", "unet") if args.command == "all" else (args.command,)):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        began = time.monotonic()
        result = stages[name](recipe, out, device, left, progress=not args.quiet)
        print(f"{name}: {result.steps_done} steps, loss {result.last_loss:.4f}, {time.monotonic() - began:.0f} s")
        if name == "vae":
            info = json.loads((out / "vae" / "config.json").read_text())
            scores = ", ".join(f"{k} {v:.3g}" for k, v in info["_fastdiff_train"]["reconstruction"].items())
            print(f"vae: scaling_factor {info['scaling_factor']:.4f}; reconstructions: {scores}")
        if not result.finished:
            print(f"{name}: stopped by --time-limit; rerun the command to continue from the checkpoint")
            return EXIT_INCOMPLETE
    if args.command == "all":
        model_dir = export_model(out, out / "model")
        print(f"exported {model_dir} ({folder_size(model_dir) / 1e6:.1f} MB)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_model, folder_size

    model_dir = export_model(Path(args.out), Path(args.model_dir) if args.model_dir else Path(args.out) / "model")
    print(f"exported {model_dir} ({folder_size(model_dir) / 1e6:.1f} MB)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from PIL import Image

    from fastdiff.pipeline import default_model_path

    from .evaluate import TARGETS, evaluate, image_grid

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    model = args.model or default_model_path()
    guidance = [float(g) for g in args.guidance.split(",")]
    began = time.monotonic()
    results = evaluate(model, args.n, guidance, args.steps, args.scheduler, args.seed, args.batch,
                       _device(args.device), dtypes[args.dtype])
    print(f"{model}: {args.n} captions, {args.steps} steps of {args.scheduler}, {time.monotonic() - began:.0f} s")
    print("guidance  " + "  ".join(f"{k:>10}" for k in results[guidance[0]]["accuracy"]))
    for g, r in results.items():
        print(f"{g:8.2f}  " + "  ".join(f"{v:10.1%}" for v in r["accuracy"].values()))
    print("target    " + "  ".join(f"{TARGETS[k]:10.0%}" if k in TARGETS else " " * 10
                                   for k in results[guidance[0]]["accuracy"]))
    best = max(results, key=lambda g: results[g]["accuracy"]["all"])
    print(f"\nconfusion at guidance {best} (rows: caption, columns: read from the image)\n"
          + results[best]["confusion"])
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"model": str(model), "n": args.n, "steps": args.steps, "scheduler": args.scheduler, "seed": args.seed,
             "accuracy": {str(g): r["accuracy"] for g, r in results.items()}}, indent=2))
    if args.grid:
        Image.fromarray(image_grid(results[best]["images"][:100])).save(args.grid)
    return 0


def build_parser(eval_prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; eval_prog names `eval` in its usage line when another command runs it (`fastdiff eval-default`)."""
    from fastdiff.schedulers import SCHEDULERS

    from .recipe import RECIPES

    parser = argparse.ArgumentParser(prog="python -m fastdiff.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("vae", "train (or resume) the VAE"), ("unet", "train (or resume) the UNet and "
                            "text encoder on the trained VAE"), ("all", "vae, unet, then export to OUT/model")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="run folder: checkpoints, logs, vae/, tokenizer/, model/")
        p.add_argument("--config", choices=sorted(RECIPES), default="default", help="recipe (default: default)")
        p.add_argument("--steps", type=int, default=None, help="steps of this stage (default: the recipe's)")
        p.add_argument("--batch", type=int, default=None, help="batch of this stage (default: the recipe's)")
        for stage in ("vae", "unet"):
            p.add_argument(f"--{stage}-steps", type=int, default=None, help=f"steps of the {stage} stage")
            p.add_argument(f"--{stage}-batch", type=int, default=None, help=f"batch of the {stage} stage")
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
        p.add_argument("--time-limit", type=float, default=None,
                       help=f"minutes; stop with a checkpoint when they run out (exit code {EXIT_INCOMPLETE})")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func=_train)

    p = sub.add_parser("export", help="write OUT's trained run as a diffusers folder")
    p.add_argument("--out", required=True, help="the run folder")
    p.add_argument("--model-dir", default=None, help="where to write (default: OUT/model)")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="prompt adherence over random captions, read by the analyser", prog=eval_prog)
    p.add_argument("--model", default=None, help="model folder (default: the embedded default model)")
    p.add_argument("--n", type=int, default=300, help="captions (default 300)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m", help="sampler (default dpmpp_2m)")
    p.add_argument("--guidance", default="7.5",
                   help="comma-separated guidance scales to compare (default 7.5, as `fastdiff generate`)")
    p.add_argument("--seed", type=int, default=0, help="image i starts from the noise of seed + i (default 0)")
    p.add_argument("--batch", type=int, default=50, help="images per pipeline call (default 50)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weights dtype (default float32, as on the CPU)")
    p.add_argument("--json", default=None, help="write the accuracies to this JSON file")
    p.add_argument("--grid", default=None, help="write the first 100 images at the best guidance to this PNG")
    p.set_defaults(func=_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None, eval_prog: Optional[str] = None) -> int:
    args = build_parser(eval_prog).parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:  # a missing stage or model, a mismatched checkpoint: say which
        raise SystemExit(f"{eval_prog or 'fastdiff.train'}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
