"""flashsd3-sample: prompts -> PNG files (with their settings in PNG text metadata), one GPU or many.

    flashsd3-sample --prompt "a raccoon reading a book" --seed 0          # Flash SD3: 4 steps, no guidance
    flashsd3-sample --demo --prompt "a cat"                               # offline toy model, seconds on CPU
    torchrun --nproc_per_node 4 -m flashsd3.cli --prompts-file prompts.txt   # images sharded over ranks

Image k of a run (prompts in order, `--num-images` each) is written as f"{k:05d}-{seed + k}-{slug}.png"
and drawn from seed + k alone (`pipeline.image_seeds`), so `--seed <seed + k>` regenerates it by itself.
Exit codes: 0 done, 1 generation failed, 2 bad input / weights unavailable / would overwrite, 130 interrupted.
All model work is in `flashsd3.pipeline`; this module owns arguments, file names, metadata and ranks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from . import hub

PROG = "flashsd3-sample"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SIZE_STEP = 16  # VAE downscale 8 x patch size 2 (SD3 and the demo config); pipeline.check_size has the final word
DEMO_SIZE = 256  # default --height/--width with --demo: the toy model is fast, its images are noise anyway
DEMO_PROMPT = "a raccoon reading a book in a lush forest"
BASE_MODEL_HINT = "the base model without LoRA wants --sampler euler --guidance 7 --steps 28 (SD3's own recipe)"


class UsageError(Exception):
    """Bad input or unavailable weights: reported as one message, exit code 2, no traceback."""


class OtherRankFailed(UsageError):
    """Another rank failed a check and reported it; this rank exits 2 quietly."""


# Arguments --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind=int, low=0, multiple=1):
    """argparse type: a finite `kind` >= low that is a multiple of `multiple`; else a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low}, got {text}")
        if value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple} (VAE x patch size), got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Text to image with SD3-medium + the Flash SD3 LoRA (4 steps).",
                epilog="Exit codes: 0 done, 1 generation failed, 2 bad input / weights unavailable / "
                       "existing files, 130 interrupted.")
    count, px = _number(low=1), _number(low=1, multiple=SIZE_STEP)
    size_help = f"multiple of {SIZE_STEP}; default 1024 ({DEMO_SIZE} with --demo)"
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="repeatable")
    g.add_argument("--prompts-file", type=Path, metavar="FILE", help="one per line, after any --prompt; blanks skipped")
    g.add_argument("--negative-prompt", metavar="TEXT", help="used only with --guidance > 1")
    g.add_argument("--num-images", type=count, default=1, metavar="N", help="images per prompt (default 1)")
    g.add_argument("--seed", type=_number(), metavar="N", help="default: random (printed); image k uses seed + k")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=count, default=4, metavar="N", help="default 4 (Flash)")
    g.add_argument("--guidance", type=_number(float), default=0.0, metavar="G", help="CFG scale, on if > 1 (default 0)")
    g.add_argument("--sampler", choices=("flash", "euler"), default="flash")
    g.add_argument("--height", type=px, metavar="PX", help=size_help)
    g.add_argument("--width", type=px, metavar="PX", help=size_help)
    g.add_argument("--batch-size", type=count, default=1, metavar="N", help="images per model call (default 1)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=hub.SD3_MEDIUM_REPO, metavar="PATH|REPO",
                   help="diffusers folder, single .safetensors file, or hub repo id (default: %(default)s)")
    g.add_argument("--lora", action="append", metavar="SOURCE[:SCALE]",
                   help=f"repeatable; default {hub.FLASH_SD3_LORA_REPO}:1, 'none' for the base model; "
                        "with --demo only what is given")
    g.add_argument("--t5", action=argparse.BooleanOptionalAction, default=False, help="load the T5-XXL encoder")
    g.add_argument("--dtype", choices=tuple(DTYPES), help="default fp16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default="auto", metavar="DEV", help="auto (cuda if available, else cpu), cpu, cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    g.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    g.add_argument("--demo", action="store_true", help="random toy-width model, no download: noise-like images")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("outputs"), metavar="DIR", help="default: %(default)s")
    g.add_argument("--json", action="store_true", help="write a .json sidecar with the metadata of each image")
    g.add_argument("--overwrite", action="store_true", help="replace existing files (refused by default)")
    return p


def parse_lora(value: str) -> tuple[str, float]:
    """'src' or 'src:scale'. The scale is taken after the last ':' only if it parses as a float, so
    'C:\\loras\\x.safetensors' and 'user/repo' stay whole; an existing path is never split."""
    head, sep, tail = value.rpartition(":")
    if not sep or not head or Path(value).exists():
        return value, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return value, 1.0
    if not math.isfinite(scale):
        raise UsageError(f"--lora {value}: the scale must be a finite number")
    return head, scale


def lora_list(values: list[str] | None) -> list[tuple[str, float]] | None:
    """None -> the pipeline's default (Flash SD3 adapter); ['none'] -> [] (base model)."""
    if values is None:
        return None
    if any(v.lower() == "none" for v in values):
        if len(values) > 1:
            raise UsageError("--lora none cannot be combined with other --lora values")
        return []
    loras = [parse_lora(v) for v in values]
    for source, _ in loras:
        check_source(source, "--lora")
    return loras


def check_source(source: str, flag: str) -> None:
    """Fail fast (before loading anything) on a local path that does not exist."""
    if not Path(source).expanduser().exists() and not hub.looks_like_repo_id(source):
        raise UsageError(f"{flag} {source}: no such file or folder, and not a hub repo id (owner/name)")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise UsageError(f"--prompts-file {args.prompts_file} has no prompts (empty or blank lines only)")
        prompts += from_file
    if not prompts:
        if not args.demo:
            raise UsageError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
        prompts = [DEMO_PROMPT]
    return prompts


# Jobs and files ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    index: int  # global image index: the same whatever the number of ranks or the batch size
    prompt: str
    seed: int  # base seed + index (pipeline.image_seeds)

    @property
    def filename(self) -> str:
        return f"{self.index:05d}-{self.seed}-{slugify(self.prompt)}.png"


def slugify(text: str, max_len: int = 40) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:  # cut at a word boundary when there is one
        cut = slug[: max_len + 1].rfind("-")
        slug = slug[:cut] if cut > 0 else slug[:max_len]
    return slug or "untitled"


def plan_jobs(prompts: list[str], per_prompt: int, seed: int) -> list[Job]:
    """Prompt-major order, as the pipeline batches [p0, p0, p1, p1]."""
    indexed = [(i * per_prompt + k, p) for i, p in enumerate(prompts) for k in range(per_prompt)]
    return [Job(j, p, seed + j) for j, p in indexed]


def check_out_dir(out: Path, jobs: list[Job], overwrite: bool, sidecar: bool) -> None:
    """Before any model work: the folder is writable and no file would be replaced silently."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".flashsd3-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out}: {e.strerror or e}") from None
    if overwrite:
        return
    names = [j.filename for j in jobs] + ([str(Path(j.filename).with_suffix(".json")) for j in jobs] if sidecar else [])
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise UsageError(f"{len(existing)} output file(s) already exist in {out}, e.g. {existing[0]}; "
                         f"pass --overwrite to replace them or choose another --out/--seed")


def atomic_write(path: Path, write, overwrite: bool) -> None:
    """write(tmp) then rename, so a file under its final name is always complete. Without overwrite the
    hard link refuses a name taken since the check (another process); plain check + rename where the
    file system has no hard links."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    taken = UsageError(f"{path} appeared while generating; not overwriting it (use --overwrite)")
    try:
        write(tmp)
        if overwrite:
            return os.replace(tmp, path)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise taken from None
        except OSError:
            if path.exists():
                raise taken from None
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_image(image, out: Path, job: Job, meta: dict, overwrite: bool, sidecar: bool) -> None:
    from PIL.PngImagePlugin import PngInfo

    meta = {"prompt": job.prompt, "index": job.index, "seed": job.seed, **meta}
    path = out / job.filename
    if sidecar:  # first, so a complete PNG always has its sidecar
        text = json.dumps(meta, indent=2, ensure_ascii=False) + "\n"
        atomic_write(path.with_suffix(".json"), lambda p: Path(p).write_text(text, encoding="utf-8"), overwrite)
    info = PngInfo()
    for key, value in meta.items():
        info.add_itxt(key, value if isinstance(value, str) else json.dumps(value))  # iTXt: UTF-8 prompts
    atomic_write(path, lambda p: image.save(p, format="PNG", pnginfo=info), overwrite)


def run_metadata(args, loras, dtype: str, negative: str | None) -> dict:
    """Settings shared by every image of the run (prompt, index and seed are added per image)."""
    if loras is None:
        loras = [(hub.FLASH_SD3_LORA_REPO, 1.0)]
    return {"negative_prompt": negative or "", "steps": args.steps, "guidance": args.guidance,
            "width": args.width, "height": args.height, "sampler": args.sampler,
            "model": "demo (random weights, flashsd3.config.DEMO)" if args.demo else args.model,
            "lora": [{"source": s, "scale": c} for s, c in loras], "t5": args.t5, "dtype": dtype,
            "software": "flashsd3"}


# Ranks (torchrun) -------------------------------------------------------------------------------

class Ranks:
    """torch.distributed when WORLD_SIZE > 1 (torchrun; gloo on CPU, nccl on CUDA), else one process."""

    def __init__(self, device: str):
        env = os.environ
        self.world, self.rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
        self.device = resolve_device(device, int(env.get("LOCAL_RANK", "0")) if self.world > 1 else None)
        self.dist = None
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.dist = dist

    def _sum(self, values: list) -> list:
        """Element-wise sum over ranks (a barrier too); float64 holds counts and seeds < 2**53 exactly."""
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        self.dist.all_reduce(t)
        return t.tolist()

    def _own_slot(self, value) -> list:
        return self._sum([value if r == self.rank else 0 for r in range(self.world)])

    def first_failure(self, failed: bool) -> int | None:
        """Every rank says whether its check failed; all learn the lowest failing rank."""
        flags = self._own_slot(int(failed)) if self.dist else [int(failed)]
        return next((r for r, f in enumerate(flags) if f), None)

    def same_seed(self, seed: int | None) -> int:
        """A random seed is drawn on rank 0 and shared, so every rank names and seeds images alike."""
        if seed is not None:
            return seed
        seed = random.SystemRandom().randrange(2**31)
        return int(self._own_slot(seed)[0]) if self.dist else seed

    def totals(self, count: int, seconds: float) -> tuple[int, float]:
        """Images written by all ranks, and the slowest rank's time (after a barrier)."""
        if not self.dist:
            return count, seconds
        self.dist.barrier()
        both = self._sum([count] + [seconds if r == self.rank else 0.0 for r in range(self.world)])
        return int(both[0]), max(both[1:])

    def close(self, synchronize: bool = False) -> None:
        """Destroy the process group (idempotent). synchronize=True (only after a run every rank
        finished) waits for all ranks first: a rank closing its gloo sockets while a peer still talks
        to it aborted that peer at exit ("terminate called without an active exception")."""
        if self.dist and self.dist.is_initialized():
            if synchronize:
                self.dist.barrier()
            self.dist.destroy_process_group()


def resolve_device(name: str, local_rank: int | None):
    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if local_rank is not None and device.index is None:  # torchrun: one GPU per local rank
            device = torch.device("cuda", local_rank)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(device)
    return device


def checked(ranks: Ranks, step):
    """Run step() on every rank; if any rank fails, the lowest failing rank reports and all exit 2."""
    error = None
    try:
        result = step()
    except UsageError as e:
        error = e
    first = ranks.first_failure(error is not None)
    if first is None:
        return result
    if error is not None and first == ranks.rank:
        raise error
    raise OtherRankFailed()


# Model and generation ---------------------------------------------------------------------------

def weights_message(e: Exception) -> str:
    """What is missing (the loader's message), the gating note, and how to use local files instead."""
    msg = str(e).rstrip(".") + "."
    if "gated" not in msg:
        msg += (f" Note that SD3-medium ({hub.SD3_MEDIUM_REPO}) is gated: accept its license on the hub page, "
                f"then `hf auth login`.")
    return (msg + " For local files: --model /path/to/sd3-diffusers-folder or --model /path/to/sd3_medium_incl_clips.safetensors"
            " (and --lora /path/to/flash-sd3-folder, or --lora none).")


def load_pipeline(args, loras, device, dtype):
    import torch

    from .pipeline import FlashSD3Pipeline
    from .weights import CheckpointError

    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        if args.demo:
            # Fixed weights (seed 0): --seed only picks the noise, so image k alone matches image k of a run.
            pipe = FlashSD3Pipeline.demo(seed=0, dtype=torch_dtype, device=device)
            if loras:
                from .lora import load_lora, merge_lora

                for source, scale in loras:
                    load_lora(pipe.transformer, source, scale=scale)
                merge_lora(pipe.transformer, discard=True)  # the CLI never unmerges
        else:
            pipe = FlashSD3Pipeline.from_pretrained(args.model, lora=loras, t5=args.t5, dtype=torch_dtype,
                                                    device=device, discard_lora=True)
        pipe.check_size(args.height, args.width)
    except (hub.WeightsUnavailable, FileNotFoundError) as e:
        raise UsageError(weights_message(e)) from None
    except CheckpointError as e:
        raise UsageError(f"cannot load the weights: {e}") from None
    except ValueError as e:  # check_size: beyond the position table
        raise UsageError(str(e)) from None
    if args.compile:
        pipe.transformer.compile(mode=args.compile_mode)  # in place: the module keeps its attributes
    return pipe


def generate_batch(pipe, args, jobs: list[Job], negative: str | None, callback) -> list:
    """One model call; each image's latents and re-noise come from its own seed (pipeline `seed=[...]`),
    so sharded/batched images match a plain run."""
    out = pipe([j.prompt for j in jobs], negative_prompt=negative, height=args.height, width=args.width,
               num_steps=args.steps, guidance=args.guidance, sampler=args.sampler, seed=[j.seed for j in jobs],
               callback=callback)
    return out.images


def generate(pipe, args, jobs: list[Job], meta: dict, negative: str | None, show: bool) -> int:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), unit="img", desc=PROG, disable=None if show else True)
    step_note = lambda i, x: bar.set_postfix_str(f"step {i + 1}/{args.steps}")  # noqa: E731
    with bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            for job, image in zip(batch, generate_batch(pipe, args, batch, negative, step_note)):
                save_image(image, args.out, job, meta, args.overwrite, args.json)
                bar.update(1)
    return len(jobs)


def run(args, ranks: Ranks) -> int:
    say = print if ranks.rank == 0 else (lambda *a, **k: None)
    loras, prompts = checked(ranks, lambda: check_inputs(args))
    seed = ranks.same_seed(args.seed)
    jobs = plan_jobs(prompts, args.num_images, seed)
    checked(ranks, lambda: check_out_dir(args.out, jobs, args.overwrite, args.json))
    dtype = args.dtype or ("fp16" if ranks.device.type == "cuda" else "fp32")
    sharded = f" over {ranks.world} ranks" if ranks.world > 1 else ""
    say(f"seed {seed}: image k uses seed + k ({plural(len(jobs))}{sharded}, {dtype} on {ranks.device})")
    if args.demo:
        say("note: --demo uses a random toy-width model: its images are noise-like by design", file=sys.stderr)
    elif loras == [] and args.steps == 4 and args.guidance == 0:
        say(f"note: {BASE_MODEL_HINT}", file=sys.stderr)
    negative = args.negative_prompt if args.guidance > 1 else None
    if args.negative_prompt is not None and negative is None:
        say("note: --negative-prompt is ignored without --guidance > 1", file=sys.stderr)
    t0 = time.perf_counter()
    pipe = checked(ranks, lambda: load_pipeline(args, loras, ranks.device, dtype))
    t1 = time.perf_counter()
    mine = jobs[ranks.rank::ranks.world]  # job j -> rank j % world: no duplicates, no gaps
    count = generate(pipe, args, mine, run_metadata(args, loras, dtype, negative), negative, ranks.rank == 0)
    total, seconds = ranks.totals(count, time.perf_counter() - t1)
    say(f"wrote {plural(total)} to {args.out} in {seconds:.2f} s ({total / seconds:.2f} images/s; "
        f"model load {t1 - t0:.2f} s)")
    return 0


def plural(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def check_inputs(args) -> tuple[list | None, list[str]]:
    """Fill size defaults (--demo: small); check sources and prompts before loading any model."""
    default = DEMO_SIZE if args.demo else 1024
    args.height, args.width = args.height or default, args.width or default
    if not args.demo:
        check_source(args.model, "--model")
    loras = lora_list(args.lora)
    return ([] if args.demo and loras is None else loras), read_prompts(args)  # the demo has no default LoRA


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ranks = None
    try:
        ranks = Ranks(args.device)
        code = run(args, ranks)
        ranks.close(synchronize=True)
        return code
    except OtherRankFailed:
        return 2
    except UsageError as e:
        where = f"[rank {ranks.rank}] " if ranks is not None and ranks.world > 1 else ""
        print(f"{PROG}: error: {where}{e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf guard of the pipeline: say what to change, no traceback
        print(f"{PROG}: generation failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if ranks is not None:
            ranks.close()


if __name__ == "__main__":
    sys.exit(main())
