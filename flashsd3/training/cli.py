"""`flashsd3-train`: encode a dataset once (`prepare`), then train on the cache (`flow`, `flash`).

    flashsd3-train prepare --data images/ --model stabilityai/stable-diffusion-3-medium-diffusers \\
        --resolution 1024 --dtype bf16 --out cache/
    flashsd3-train flow --cache cache/ --out runs/lora1 --steps 2000 --batch-size 16 --lora-rank 64
    torchrun --nproc_per_node 2 -m flashsd3.training.cli flow --config run.toml
    flashsd3-train flow --cache cache/ --out runs/lora1 --resume --steps 4000    # continue, or after Ctrl-C
    flashsd3-train flash --cache cache/ --out runs/flash --steps 10000 --activation-checkpointing  # distil

Training flags are made from the objective's config dataclass (training/config.py, flow.py, flash/recipe.py):
each setting is a --flag and a key of --config FILE (JSON or TOML); flags win over the file. A new objective
registers itself in `commands()`. Exit codes: 0 done, 1 training stopped (a loss or update not finite; the last
checkpoint is kept), 2 bad input (one line, nothing written or lost), 130 interrupted (checkpointed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

PROG = "flashsd3-train"
INTERRUPTED = 130
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
METAVARS = {int: "N", float: "X", str: "TEXT"}


def commands() -> dict:
    """subcommand -> (config dataclass, task class); a new objective adds itself here."""
    from .flash.task import FlashConfig, FlashTask
    from .flow import FlowConfig, FlowTask

    return {"flow": (FlowConfig, FlowTask), "flash": (FlashConfig, FlashTask)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{PROG}: error: {message}\n")


def add_config_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per setting; unset flags stay absent (SUPPRESS) so the file and resume rules apply. Lists are
    comma-separated text, parsed with the file's values (config.convert) so both name the setting in errors."""
    from .config import flag, settings

    for s in settings(cls).values():
        default = f"; default {_shown(s.default)}" if s.default not in ("", ()) else ""
        if s.kind is bool:
            parser.add_argument(flag(s.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=s.help)
            continue
        if typing.get_origin(s.kind) is tuple:
            nested = typing.get_origin(typing.get_args(s.kind)[0]) is tuple
            kind, metavar = str, "A,B/C,D" if nested else "A,B,..."
        else:
            kind, metavar = s.kind, METAVARS[s.kind]
        parser.add_argument(flag(s.name), type=kind, default=argparse.SUPPRESS, choices=s.choices, metavar=metavar,
                            help=s.help + default)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return "/".join(map(_shown, value)) if value and isinstance(value[0], tuple) else ",".join(map(str, value))
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Train SD3 adapters or weights on a cached dataset.",
                epilog="Exit codes: 0 done, 2 bad input, 130 interrupted (a checkpoint is written first).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    q = sub.add_parser("prepare", help="encode images and captions once into a cache folder")
    q.add_argument("--data", type=Path, required=True, help="a folder of images with same-name .txt captions, "
                                                             "or a .jsonl manifest of {\"image\", \"caption\"}")
    q.add_argument("--out", type=Path, required=True, help="cache folder (resumed if it holds an unfinished cache)")
    q.add_argument("--model", help="SD3 weights (diffusers folder, single file or hub id) for the VAE and CLIPs")
    q.add_argument("--demo", action="store_true", help="the offline toy-width demo model instead of --model")
    q.add_argument("--resolution", type=int, required=True, help="square training side in pixels, multiple of 16")
    q.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="encoders and stored tensors")
    q.add_argument("--shard-size", type=int, default=256, help="examples per shard file (default 256)")
    q.add_argument("--batch-size", type=int, default=8, help="images per encoder call (default 8)")
    q.add_argument("--sample-prompts", type=Path, help="prompts for training sample grids, one per line "
                                                       "(default: the first four captions)")
    q.add_argument("--skip-bad", action="store_true", help="skip unreadable images and images without a caption "
                                                           "(counted and listed in cache.json) instead of stopping")
    q.add_argument("--seed", type=int, default=0, help="the VAE posterior sample of example i uses seed + i "
                                                       "(0 .. 2**64 - 1)")
    q.add_argument("--negative-prompt", help="CFG negative prompt of `flash` distillation (default: the Flash SD3 "
                                             "recipe's long negative prompt; '' for the empty prompt)")
    q.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    q.add_argument("--overwrite", action="store_true", help="replace a cache made differently")
    for name, (cls, _) in commands().items():
        t = sub.add_parser(name, help=(cls.__doc__ or "").strip())
        t.add_argument("--config", type=Path, help="JSON or TOML file of settings (flags win)")
        mode = t.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        mode.add_argument("--overwrite", action="store_true", help="replace the run in --out")
        add_config_flags(t, cls)
    return p


# prepare ------------------------------------------------------------------------------------------

CACHE_FILES = ("cache.json", "empty.safetensors", "negative.safetensors", "prompts.safetensors")


def _cache_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not a cache (nothing of the user's is touched)."""
    if out.is_file():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "cache.json").is_file():
        raise ValueError(f"--out {out} is not empty and holds no cache: choose an empty or new folder")
    if overwrite and (out / "cache.json").is_file():
        for p in [*out.glob("shard-*.safetensors"), *(out / n for n in CACHE_FILES)]:
            p.unlink(missing_ok=True)


def prepare(args) -> int:
    import torch
    from tqdm import tqdm

    from ..distributed import resolve_device
    from ..rules import check_seed
    from .cache import prepare_cache, spec_for
    from .data import DataError, check_resolution, find_examples, read_text_file
    from .models import DEMO_MODEL, load_encoders, model_id

    device = resolve_device(args.device, None)
    if args.demo == bool(args.model):
        raise ValueError("give --model PATH|REPO or --demo (one of them)")
    if args.shard_size < 1 or args.batch_size < 1:
        raise ValueError("--shard-size and --batch-size must be positive")
    check_seed(args.seed, 1, "--seed")
    check_resolution(args.resolution)
    examples, problems = find_examples(args.data)
    if problems and not args.skip_bad:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix it or pass --skip-bad to leave such examples out")
    if not examples:
        raise DataError(f"no usable example in {args.data}: all {len(problems)} were skipped")
    prompts = None
    if args.sample_prompts:
        text = read_text_file(args.sample_prompts, "--sample-prompts")
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    _cache_folder(args.out, args.overwrite)
    vae, text = load_encoders(DEMO_MODEL if args.demo else args.model, getattr(torch, DTYPES[args.dtype]), device)
    spec = spec_for(DEMO_MODEL if args.demo else model_id(args.model), args.resolution, vae, text, args.seed)
    with tqdm(total=len(examples), unit="img", desc="prepare", disable=None) as bar:
        record = prepare_cache(args.out, examples, spec, vae, text, shard_size=args.shard_size,
                               batch_size=args.batch_size, skip_bad=args.skip_bad, skipped=problems,
                               sample_prompts=prompts, progress=lambda n: bar.update(n - bar.n),
                               **({} if args.negative_prompt is None else {"negative_prompt": args.negative_prompt}))
    skipped = f", skipped {len(record['skipped'])} (listed in cache.json)" if record["skipped"] else ""
    print(f"cached {sum(record['rows'])} examples in {len(record['shards'])} shards at {args.out}{skipped}")
    return 0


# training -----------------------------------------------------------------------------------------

def train_command(args) -> int:
    from .config import make_config, read_config_file, resumed_config, settings
    from .folder import check_out
    from .loop import train

    cls, task = commands()[args.command]
    flags = {k: v for k, v in vars(args).items() if k in settings(cls)}
    file = read_config_file(args.config) if args.config else {}
    if not args.resume:
        cfg = make_config(cls, (file, str(args.config)), (flags, None))
        return train(cfg, task, resume=False, overwrite=args.overwrite)
    out = flags.get("out", file.get("out"))
    if not isinstance(out, str) or not out:
        raise ValueError("--out is required (or 'out' in the config file, as text): the run to resume")
    out = Path(out)
    check_out(out, resume=True, overwrite=False)  # a run folder with its config.json
    saved = out / "config.json"
    try:
        saved_config = json.loads(saved.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{saved} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(saved_config, dict) or saved_config.get("command") != args.command:
        what = saved_config.get("command") if isinstance(saved_config, dict) else None
        raise ValueError(f"{out} holds a {what!r} run, not {args.command!r}")
    return train(resumed_config(cls, saved_config, {**file, **flags}, out), task, resume=True, overwrite=False)


def main(argv: list[str] | None = None) -> int:
    from ..cli import reproducible_mkl

    reproducible_mkl()  # before anything imports torch (build_parser imports the objectives)
    args = build_parser().parse_args(argv)
    from ..hub import WeightsUnavailable
    from ..weights import CheckpointError
    from .loop import NonFinite

    rank = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        return prepare(args) if args.command == "prepare" else train_command(args)
    except (ValueError, WeightsUnavailable, CheckpointError, FileNotFoundError) as e:
        print(f"{PROG}: error: {rank}{_one_line(e)}", file=sys.stderr)
        return 2
    except NonFinite as e:
        print(f"{PROG}: error: {rank}{_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = "; finished shards are kept: run the same command to resume" if args.command == "prepare" else ""
        print(f"{PROG}: interrupted{kept}", file=sys.stderr)
        return INTERRUPTED


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
