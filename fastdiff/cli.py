"""The `fastdiff` console script: `fastdiff generate "PROMPT" --out x.png` (`--model SDXL --refiner REFINER` hands the
last fifth of the denoising to SDXL's refiner), `fastdiff info` (`--model PATH`: how it would run), `fastdiff serve`
(the AUTOMATIC1111 HTTP API), `fastdiff eval-default` (prompt adherence of the embedded default model).

Parsing and the checks that need no model import no torch: `--help`, `--version` and argument errors answer at
once; torch is imported by the command that runs.
"""
import argparse
import importlib.util
import os
import platform
import re
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from fastdiff import __version__
from fastdiff.request import LORA_SUFFIXES, SEED_MAX, check_request, lora_files, lora_tags, lora_weight
from fastdiff.schedulers import SCHEDULERS


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from fastdiff import ops

    cuda = torch.cuda.is_available()
    print(f"fastdiff   {__version__}")
    print(f"python     {platform.python_version()}")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton     {_package_version('triton')}")
    print(f"device     {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device)'}")
    if cuda:
        from fastdiff import tuning

        print(f"tuning     {tuning.describe(torch.cuda.current_device())}")
    ok, why = ops.availability("cuda", "cpu")
    print(f"fastdiff._C {'loaded' if ok else 'unavailable'}: {why}")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    width = max(map(len, ops.OPS)) + 2
    print("\n" + "op".ljust(width) + "".join(f"{d:<16}" for d in devices) + "setting")
    for op in ops.OPS:
        print(op.ljust(width) + "".join(f"{_backend_label(ops.resolve(op, d), d):<16}" for d in devices)
              + ops.get_backend(op))
    print("\nbackends:")
    for device in devices:
        for backend in ops.BACKENDS[1:]:
            ok, why = ops.availability(backend, device)
            print(f"  {_backend_label(backend, device):<16} on {device:<5} {'yes' if ok else 'no '}  {why}")
    print('\n"cuda" is the name of the fastdiff._C backend in settings: C++ on the CPU, CUDA on the GPU')
    if args.model is not None:
        _model_info(args)
    return 0


def _model_info(args: argparse.Namespace) -> None:
    """How the model at --model runs with --device and --dtype: loaded as `generate` loads it."""
    import torch

    from fastdiff.pipeline import load_cached

    _check_device(args.device)
    if not os.path.exists(args.model):
        raise CommandError(f"--model {args.model!r}: no such file or folder", 2)
    try:
        pipe = load_cached(args.model, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    kind = "SDXL refiner" if pipe.refiner else "SDXL" if pipe.sdxl else "SD1/SD2"
    print(f"\nmodel      {pipe.source}")
    print(f"family     {kind}")
    print(f"unet       {_dtype_name(pipe.dtype)} on {pipe.device}")
    upcast = pipe.vae_dtype != pipe.dtype
    print(f"vae        decodes in {_dtype_name(pipe.vae_dtype)}"
          + (f" (force_upcast: SDXL's VAE overflows {_dtype_name(pipe.dtype)})" if upcast else ""))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _backend_label(backend: str, device: str) -> str:
    """What runs: the "cuda" backend is fastdiff._C, whose CPU half is C++."""
    if backend != "cuda":
        return backend
    return "cuda (_C CUDA)" if device == "cuda" else "cuda (_C C++)"


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DENOISING_END = 0.8  # where --refiner takes over by default: the last fifth of the denoising, as SDXL's authors do
DTYPES = ("bfloat16", "float16", "float32")
# check_request's argument names as the command line spells them
FLAGS = {"guidance_scale": "--guidance", "num_images": "--num-images", "negative_prompt": "--negative",
         "height": "--height", "width": "--width", "steps": "--steps", "seed": "--seed"}


class CommandError(Exception):
    """A one-line answer to the user and the exit code: 2 for bad arguments, 1 for a failure while running."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def output_paths(out: str, n: int) -> list[Path]:
    """`x.png` for one image; `x-0.png`, `x-1.png`, ... for several."""
    path = Path(out)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def prompt_loras(args: argparse.Namespace) -> list[tuple[Path, float]]:
    """The LoRAs the prompt's <lora:NAME:WEIGHT> tags name, found by file name under --lora-dir; the tags are taken
    out of args.prompt."""
    args.prompt, tags = lora_tags(args.prompt)
    if not tags:
        return []
    if args.lora_dir is None:
        raise CommandError(f"the prompt names <lora:{tags[0][0]}...>; give --lora-dir, the folder to find it in", 2)
    folder = Path(args.lora_dir)
    if not folder.is_dir():
        raise CommandError(f"--lora-dir {args.lora_dir!r}: no such folder", 2)
    try:
        files = lora_files(folder)
    except ValueError as e:
        raise CommandError(str(e), 2) from None
    loras = []
    for name, weight in tags:
        path = files.get(name)
        if path is None:
            raise CommandError(f"<lora:{name}>: no file named {name}{{{','.join(LORA_SUFFIXES)}}} in "
                               f"{str(folder)!r}", 2)
        try:
            loras.append((path, _lora_weight(weight)))
        except argparse.ArgumentTypeError as e:
            raise CommandError(f"<lora:{name}:{weight}>: weight {e}", 2) from None
    return loras


def check_generate(args: argparse.Namespace) -> None:
    """Every check of `generate`'s arguments that needs no model (and no torch)."""
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise CommandError(f"--out must end in one of {', '.join(IMAGE_SUFFIXES)}, got {args.out!r}", 2)
    if not out.parent.resolve().is_dir():
        raise CommandError(f"--out folder {str(out.parent)!r} does not exist", 2)
    if not os.access(out.parent.resolve(), os.W_OK):
        raise CommandError(f"--out folder {str(out.parent)!r} is not writable", 2)
    folders = [str(p) for p in output_paths(args.out, args.num_images) if p.is_dir()]
    if folders:
        raise CommandError(f"--out {folders[0]!r} is a folder; give an image file name", 2)
    if (args.height is None) != (args.width is None):
        raise CommandError("give --height and --width together", 2)
    for flag, path in (("--model", args.model), ("--refiner", args.refiner)):
        if path is not None and not os.path.exists(path):
            raise CommandError(f"{flag} {path!r}: no such file or folder", 2)
    if args.denoising_end is not None and args.refiner is None:
        raise CommandError("--denoising-end is where the base hands off to --refiner; give --refiner", 2)
    for flag, path in [("--lora", path) for path, _ in args.lora] + [("--embedding", p) for p in args.embedding]:
        if not path.is_file():
            raise CommandError(f"{flag} {str(path)!r}: no such file", 2)
    args.lora += prompt_loras(args)
    repeated = [str(path) for i, (path, _) in enumerate(args.lora) if path in [p for p, _ in args.lora[:i]]]
    if repeated:
        raise CommandError(f"LoRA {repeated[0]!r} is given twice; give it once, with the weight you want", 2)
    _check_device(args.device)
    try:
        check_request(args.prompt, args.steps, negative_prompt=args.negative, guidance_scale=args.guidance,
                      height=args.height, width=args.width, seed=args.seed, scheduler=args.scheduler,
                      karras=args.karras, num_images=args.num_images)
    except ValueError as e:
        name, _, rest = str(e).partition(" ")
        raise CommandError(f"{FLAGS.get(name, name)} {rest}", 2) from None


def _check_device(device: Optional[str]) -> None:
    if device is not None and device.startswith("cuda") and _cpu_only_torch():
        raise CommandError(f"--device {device}: the installed torch ({_package_version('torch')}) is a CPU-only "
                           f"build; use --device cpu, or install a CUDA build of torch", 2)


def _cpu_only_torch() -> bool:
    """Whether the installed torch is a CPU-only build (its lib/ has no CUDA or ROCm library), found without
    importing it. False where unsure: torch itself then answers for the device."""
    spec = importlib.util.find_spec("torch")
    lib = Path(next(iter(spec.submodule_search_locations or []), "")) / "lib" if spec else None
    if lib is None or not (lib / "libtorch_cpu.so").is_file():
        return False
    return not any(lib.glob("libtorch_cuda*")) and not any(lib.glob("libtorch_hip*"))


def cmd_generate(args: argparse.Namespace) -> int:
    check_generate(args)
    import torch  # only now: the checks above answer without it
    from PIL import Image

    from fastdiff.pipeline import generate, load_cached

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        pipe = load_cached(args.model, device=args.device, dtype=dtype)
        pipe.memory_limit = None if args.max_memory is None else int(args.max_memory * 2**30)
        for path in args.embedding:
            pipe.load_textual_inversion(path)
        for path, weight in args.lora:
            pipe.load_lora(path, weight, name=str(path))
        common = dict(negative_prompt=args.negative, guidance_scale=args.guidance, seed=args.seed,
                      scheduler=args.scheduler, karras=args.karras, num_images=args.num_images,
                      progress=not args.quiet)
        if args.refiner is None:
            images = generate(args.prompt, args.steps, model=pipe, height=args.height, width=args.width, **common)
        else:
            images = _base_then_refiner(args, pipe, load_cached(args.refiner, device=args.device, dtype=dtype),
                                        common)
    except (ValueError, OSError) as e:  # a model it cannot read, a device it does not have, no room
        raise CommandError(str(e)) from None
    except (torch.OutOfMemoryError, MemoryError):
        raise CommandError("out of memory while sampling: ask for fewer or smaller images, or lower --max-memory "
                           "so the guard refuses earlier") from None
    for image, path in zip(images, output_paths(args.out, len(images))):
        # Write next to the target and rename, so an interrupted run never leaves a half-written image.
        tmp = path.with_name(f".{path.name}.partial")
        try:
            image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
            os.replace(tmp, path)
        except OSError as e:
            raise CommandError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {path} ({image.width}x{image.height})")
    return 0


def _base_then_refiner(args: argparse.Namespace, base, refiner, common: dict) -> list:
    """SDXL's ensemble of experts: the base denoises down to --denoising-end (default 0.8) and hands its latents
    to the refiner, which finishes from there with the same prompt, steps, sampler and seed."""
    import torch

    from fastdiff.pipeline import generate
    from fastdiff.schedulers import denoising_start_index

    for flag, path, pipe in (("--model", args.model, base), ("--refiner", args.refiner, refiner)):
        if not pipe.sdxl:
            raise CommandError(f"--refiner hands off between SDXL models; {flag} {path!r} is an SD1/SD2 model")
    fraction = DENOISING_END if args.denoising_end is None else args.denoising_end
    start = denoising_start_index(refiner.schedule(args.scheduler, args.steps, karras=args.karras), fraction)
    if start >= args.steps:  # found before the base runs
        raise CommandError(f"--steps {args.steps} with --denoising-end {fraction} leaves the refiner no step: "
                           f"{args.scheduler}'s timesteps stop above the cut; raise --steps or lower --denoising-end")
    latents = generate(args.prompt, args.steps, model=base, height=args.height, width=args.width,
                       denoising_end=fraction, output_type="latent", **common)
    return generate(args.prompt, args.steps, model=refiner, image=torch.stack(latents), denoising_start=fraction,
                    **common)


def check_serve(args: argparse.Namespace) -> None:
    """Every check of `serve`'s arguments that needs no model (and no torch)."""
    for flag, path, kind in (("--model", args.model, "file or folder"), ("--models-dir", args.models_dir, "folder"),
                             ("--lora-dir", args.lora_dir, "folder")):
        if path is not None and not (os.path.isdir(path) if kind == "folder" else os.path.exists(path)):
            raise CommandError(f"{flag} {path!r}: no such {kind}", 2)
    if args.api_auth is not None and ":" not in args.api_auth:
        raise CommandError("--api-auth must be USER:PASSWORD", 2)
    _check_device(args.device)
    for module in ("fastapi", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise CommandError(f"fastdiff serve needs {module}: pip install 'fastdiff[serve]'", 2)
    if args.ray:
        _check_serve_ray(args)
    elif args.replicas is not None or args.gpus_per_replica is not None:
        raise CommandError("--replicas and --gpus-per-replica need --ray", 2)


def _check_serve_ray(args: argparse.Namespace) -> None:
    try:
        importlib.import_module("ray.serve")
    except ImportError:
        raise CommandError("fastdiff serve --ray needs ray[serve]: pip install 'ray[serve]'", 2) from None
    gpus = _gpus_per_replica(args)
    if gpus > 1 and not gpus.is_integer():
        raise CommandError(f"--gpus-per-replica {gpus:g}: above 1, a replica takes whole GPUs", 2)
    if args.device is not None and args.device.startswith("cuda:"):
        raise CommandError(f"--device {args.device} with --ray: each replica sees only the GPUs Ray gives it; "
                           f"use --device cuda", 2)
    if args.device == "cpu" and gpus > 0:
        raise CommandError("--gpus-per-replica with --device cpu: a CPU engine takes no GPU", 2)
    if args.device == "cuda" and gpus == 0:
        raise CommandError("--device cuda with --gpus-per-replica 0: a replica without a GPU sees none", 2)


def _gpus_per_replica(args: argparse.Namespace) -> float:
    """--gpus-per-replica, by default 1 (0 with --device cpu)."""
    if args.gpus_per_replica is not None:
        return args.gpus_per_replica
    return 0.0 if args.device == "cpu" else 1.0


def cmd_serve(args: argparse.Namespace) -> int:
    check_serve(args)
    import torch

    from fastdiff.serve.a1111 import Limits
    from fastdiff.serve.service import Catalog

    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_images=args.max_images)
    options = dict(limits=limits, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                   max_queue=args.max_queue, max_batch=args.max_batch, queue_timeout_s=args.queue_timeout)
    auth = tuple(args.api_auth.split(":", 1)) if args.api_auth else None
    try:
        catalog = Catalog.discover(args.model, args.models_dir, args.lora_dir)
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    banner = (f"fastdiff serve: the AUTOMATIC1111 API on http://{args.host}:{args.port}/sdapi/v1/ (model "
              f"{catalog.default!r}, {len(catalog.models)} model(s), {len(catalog.loras)} LoRA(s)")
    if args.ray:
        from fastdiff.serve import ray_serve

        replicas, gpus = args.replicas or 1, _gpus_per_replica(args)
        try:
            ray_serve.deploy(catalog, replicas=replicas, gpus_per_replica=gpus, host=args.host, port=args.port,
                             api_key=args.api_key, api_auth=auth, **options)
        except (ValueError, RuntimeError) as e:  # too few CPUs or GPUs; replicas that failed to start
            raise CommandError(str(e)) from None
        print(f"{banner}; {replicas} Ray Serve replica(s), {gpus:g} GPU(s) each)", file=sys.stderr)
        ray_serve.serve_forever()
        return 0
    import uvicorn

    from fastdiff.serve.app import create_app
    from fastdiff.serve.service import Service

    try:
        service = Service(catalog, **options)
        service.preload()
    except (ValueError, OSError) as e:
        raise CommandError(str(e)) from None
    print(banner + ")", file=sys.stderr)
    try:
        uvicorn.run(create_app(service, api_key=args.api_key, api_auth=auth), host=args.host, port=args.port,
                    log_level="warning")
    finally:
        service.close()
    return 0


def cmd_eval_default(options: Sequence[str]) -> int:
    """`python -m fastdiff.train eval` under the main command: its options pass through unchanged."""
    from fastdiff.train.__main__ import main as train_main

    return train_main(["eval", *options], eval_prog="fastdiff eval-default")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64 - 1, got {text}")
    return value


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def _lora_weight(text: str) -> float:
    try:
        return lora_weight(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _lora(text: str) -> tuple[Path, float]:
    """--lora PATH or PATH:WEIGHT (a path may hold colons of its own: only a numeric tail is a weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and weight:
        try:
            return Path(path), _lora_weight(weight)
        except argparse.ArgumentTypeError:
            pass
    return Path(text), 1.0


def _number(cast, accept, expected: str):
    """An argparse type: the text read by `cast` (int or float), kept when `accept` holds, else refused with
    `expected` and the text."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {text}")
        return value

    return parse


def _positive_number(unit: str):
    return _number(float, lambda v: 0 < v < float("inf"), f"must be a positive number of {unit}")


_positive_int = _number(int, lambda v: v >= 1, "must be a positive integer")
_gpus = _number(float, lambda v: 0 <= v < float("inf"), "must be a number of GPUs >= 0")
_fraction = _number(float, lambda v: 0 < v < 1, "must be a number strictly between 0 and 1")
_gib = _positive_number("GiB")
_seconds = _positive_number("seconds")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `fastdiff generate: argument --seed: ...` and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fastdiff", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and which backend each op uses; with --model, how that "
                                       "model runs (its family, dtypes, the VAE's decoding precision)")
    info.add_argument("--model", default=None, help="a diffusers folder or single file to describe (loads it)")
    info.add_argument("--device", type=_device, default=None, help="as generate's (default: cuda if available)")
    info.add_argument("--dtype", choices=DTYPES, default=None, help="as generate's (default: float16 on CUDA)")
    info.set_defaults(func=cmd_info)

    gen = sub.add_parser("generate", help="sample images for a prompt and write them to --out")
    gen.add_argument("prompt", help="the text prompt")
    gen.add_argument("--out", required=True, help="output image path (.png/.jpg/.webp); -N suffixes for several")
    gen.add_argument("--model", default=None, help="diffusers folder or single .safetensors/.ckpt file "
                                                   "(default: the embedded default model)")
    gen.add_argument("--refiner", default=None, metavar="PATH",
                     help="an SDXL refiner (diffusers folder or single file) that finishes what the SDXL --model "
                          "starts")
    gen.add_argument("--denoising-end", type=_fraction, default=None, metavar="FRACTION",
                     help=f"with --refiner: the fraction of the denoising the base does (default {DENOISING_END})")
    gen.add_argument("--steps", type=_positive_int, default=25, help="sampling steps (default 25)")
    gen.add_argument("--seed", type=_seed, default=None, help="random seed, 0 to 2**64 - 1 (default: random)")
    gen.add_argument("--scheduler", choices=SCHEDULERS, default="dpmpp_2m", help="sampler (default dpmpp_2m)")
    gen.add_argument("--karras", action="store_true", help="use Karras sigmas")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels (multiple of 8)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels (multiple of 8)")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images to generate (default 1)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=DTYPES, default=None,
                     help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    gen.add_argument("--max-memory", type=_gib, default=None, metavar="GIB",
                     help="working memory a run may take, in GiB (default: what the device has free)")
    gen.add_argument("--lora", type=_lora, action="append", default=[], metavar="PATH[:WEIGHT]",
                     help="merge a LoRA (kohya/A1111 or diffusers format) at WEIGHT (default 1); repeatable")
    gen.add_argument("--lora-dir", default=None, metavar="DIR",
                     help="where <lora:NAME:WEIGHT> tags in the prompt find NAME.safetensors (subfolders too)")
    gen.add_argument("--embedding", type=Path, action="append", default=[], metavar="PATH",
                     help="load a textual-inversion embedding; its token is the file's name (A1111) or the one "
                          "it stores (diffusers); repeatable")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="the AUTOMATIC1111 HTTP API (/sdapi/v1/txt2img, ...), batching concurrent "
                                         "requests")
    serve.add_argument("--model", default=None, help="the model served first (default: the embedded default model)")
    serve.add_argument("--models-dir", default=None, metavar="DIR",
                       help="more models to switch to (sd_model_checkpoint): diffusers folders and .safetensors/.ckpt "
                            "files in DIR")
    serve.add_argument("--lora-dir", default=None, metavar="DIR", help="the LoRAs <lora:NAME:WEIGHT> can name")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_positive_int, default=7860, help="port (default 7860, as A1111)")
    access = serve.add_mutually_exclusive_group()
    access.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    access.add_argument("--api-auth", default=None, metavar="USER:PASSWORD",
                        help="require these HTTP Basic credentials on every request (A1111's --api-auth)")
    serve.add_argument("--device", type=_device, default=None,
                       help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    serve.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    serve.add_argument("--max-batch", type=_positive_int, default=8,
                       help="images of compatible requests run in one batch (default 8)")
    serve.add_argument("--max-queue", type=_positive_int, default=64,
                       help="requests waiting before new ones get 503 (default 64)")
    serve.add_argument("--queue-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                       help="a request not started within this answers 503 (default 600)")
    serve.add_argument("--max-size", type=_positive_int, default=2048, help="largest width or height (default 2048)")
    serve.add_argument("--max-steps", type=_positive_int, default=150, help="most steps per request (default 150)")
    serve.add_argument("--max-images", type=_positive_int, default=16,
                       help="most images per request, batch_size x n_iter (default 16)")
    serve.add_argument("--ray", action="store_true",
                       help="run on Ray Serve (the cluster ray.init() finds, else a local one): --replicas engines "
                            "behind one address, each with its own queue and batches")
    serve.add_argument("--replicas", type=_positive_int, default=None, help="engines with --ray (default 1)")
    serve.add_argument("--gpus-per-replica", type=_gpus, default=None, metavar="GPUS",
                       help="GPUs each replica reserves with --ray; a fraction shares a GPU (default 1, 0 with "
                            "--device cpu)")
    serve.set_defaults(func=cmd_serve)

    # Listed for --help only: main() hands everything after `eval-default` to `python -m fastdiff.train eval`.
    sub.add_parser("eval-default", help="prompt adherence of the default model over 300 random captions, read "
                                        "from the pixels (`fastdiff eval-default --help` for its options)")
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"fastdiff: {message}\n"  # a note for the user, not a pointer into fastdiff's source


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval-default"]:
        return cmd_eval_default(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CommandError as e:
        print(f"fastdiff: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("fastdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
