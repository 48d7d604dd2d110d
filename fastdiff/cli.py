"""The `fastdiff` console script: `fastdiff generate "PROMPT" --out x.png`, `fastdiff info`."""
import argparse
import platform
import sys
from typing import Optional, Sequence

import torch

from fastdiff import __version__, ops


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    print(f"fastdiff   {__version__}")
    print(f"python     {platform.python_version()}")
    print(f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton     {_package_version('triton')}")
    print(f"device     {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device)'}")
    ok, why = ops.availability("cuda", "cpu")
    print(f"fastdiff._C {'loaded' if ok else 'unavailable'}: {why}")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    print("\nop              " + "".join(f"{d:<12}" for d in devices) + "setting")
    for op in ops.OPS:
        print(f"{op:<16}" + "".join(f"{ops.resolve(op, d):<12}" for d in devices) + ops.get_backend(op))
    print("\nbackends:")
    for device in devices:
        for backend in ops.BACKENDS[1:]:
            ok, why = ops.availability(backend, device)
            print(f"  {backend:<10} on {device:<5} {'yes' if ok else 'no '}  {why}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op uses").set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
