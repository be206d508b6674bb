"""flashsd3-sample: prompts (+ an image to edit) -> PNG files with their settings in PNG text metadata, one GPU or many.

    flashsd3-sample --prompt "a raccoon reading a book" --seed 0          # Flash SD3: 4 steps, no guidance
    flashsd3-sample --demo --prompt "a cat"                               # offline toy model, seconds on CPU
    flashsd3-sample --prompt "a fox" --image in.png --mask mask.png       # inpaint the white part of the mask
    torchrun --nproc_per_node 4 -m flashsd3.cli --prompts-file prompts.txt   # batches shared out over ranks

Image k of a run (prompts in order, `--num-images` each) is written as f"{k:05d}-{seed + k}-{slug}.png"
and drawn from seed + k alone, so `--seed <seed + k>` regenerates it by itself (`flashsd3.outputs`).
Every input that can be checked without loading a model is checked first, then the output folder is
created, then the model is loaded. Exit codes: 0 done, 1 generation failed, 2 bad input / weights
unavailable / would overwrite, 130 interrupted. This module owns arguments, checks and exit codes;
model work is in `flashsd3.pipeline`, files in `flashsd3.outputs`, ranks in `flashsd3.distributed`.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import time
import warnings
from pathlib import Path

from . import hub
from .controlnet import flags as control_flags
from .cpu_memory import keep_freed_memory
from .distributed import Ranks, resolve_device
from .outputs import OutputError, Plan, check_out_dir, new_file_mode, save_image
from .preflight import check_loras, model_config
from .rules import InputError, check_seed, check_size
from .settings import SIZE_FLAGS, Inputs, call, check_schedule, describe, load_edit, metadata, run_recipe, run_size

PROG = "flashsd3-sample"
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # and "auto" (flashsd3.precision)
DEMO_SIZE = 256  # default --height/--width with --demo: the toy model is fast, its images are noise anyway
DEMO_PROMPT = "a raccoon reading a book in a lush forest"
MESSAGE_LIMIT = 800  # characters of an error message shown (a folder listing or key list can be huge)


class UsageError(Exception):
    """Bad input or unavailable weights: reported as one line, exit code 2, no traceback."""


class OtherRankFailed(UsageError):
    """Another rank's check failed; rank 0 reports it and this rank exits 2 quietly."""


BAD_INPUT = (UsageError, OutputError, InputError)  # one line on stderr, exit code 2 (PreflightError is an InputError)


def reproducible_mkl() -> None:
    """Same seed, same pixels in every process: MKL's matrix products otherwise depend on buffer
    alignment, so a run could differ from the last by one pixel level. Conditional numerical
    reproducibility (MKL_CBWR, read when MKL starts, so before torch is imported) removes that.
    A value the user set is kept."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


# Arguments --------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind=int, low=0, high=None):
    """argparse type: a finite `kind` in [low, high) (no bound where None); else a one-line error. Flags whose
    values a rule of `flashsd3.rules` checks (size, seed, steps, strength) are only parsed here, so the rule's
    message is the one the pipeline gives."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if low is not None and (not math.isfinite(value) or value < low or (high is not None and value >= high)):
            bound = f">= {low}" if high is None else f"from {low} to {high - 1}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value
    return parse


def _layers(text: str) -> tuple[int, ...]:
    """'7,8,9' -> (7, 8, 9); 'none' -> () (turns the recipe's skip-layer guidance off)."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 7,8,9 or 'none', got {text!r}") from None


def _expand(text: str) -> str:
    """A path flag's value with `~` expanded (also for flags that take hub repo ids, which never start with ~)."""
    return os.path.expanduser(text)


def build_parser() -> argparse.ArgumentParser:
    from .recipes import RECIPES  # imports torch: main() has set MKL's environment by now
    from .sampling.table import SAMPLERS

    p = _Parser(prog=PROG, description="Text to image (and img2img, inpainting) with SD3-medium + the Flash SD3 "
                                       "LoRA (4 steps), or SD3 / SD3.5 with their own recipes.",
                epilog="Exit codes: 0 done, 1 generation failed, 2 bad input / weights unavailable / "
                       "existing files, 130 interrupted.")
    count, parsed, path = _number(low=1), _number(low=None), lambda t: Path(_expand(t))
    size_help = f"multiple of 16 (SD3); default: the --image's, else 1024 ({DEMO_SIZE} with --demo)"
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="repeatable")
    g.add_argument("--prompts-file", type=path, metavar="FILE", help="one per line, after any --prompt; blanks skipped")
    g.add_argument("--negative-prompt", metavar="TEXT", help="used only with --guidance > 1")
    g.add_argument("--num-images", type=count, default=1, metavar="N", help="images per prompt (default 1)")
    g.add_argument("--seed", type=parsed, metavar="N",
                   help="0 .. 2**64 - 1; default: random (printed); image k uses seed + k")
    g = p.add_argument_group("sampling (default: the recipe; each flag set overrides it)")
    g.add_argument("--recipe", choices=list(RECIPES), help="default: the model's: flash-sd3 for SD3 with a LoRA "
                   "(and --demo), sd3 with --lora none, sd3.5-medium / sd3.5-large by architecture")
    g.add_argument("--steps", type=parsed, metavar="N", help="sampler steps (flash-sd3: 4, sd3: 28)")
    g.add_argument("--guidance", type=_number(float), metavar="G", help="CFG scale, on if > 1 (flash-sd3: 0, sd3: 7)")
    g.add_argument("--sampler", choices=list(SAMPLERS))
    g.add_argument("--shift", type=_number(float, low=1e-6), metavar="S", help="sigma time shift (recipes: 3)")
    g.add_argument("--slg-layers", type=_layers, metavar="I,J|none",
                   help="skip-layer guidance: joint blocks skipped in an extra pass (needs --guidance > 1; "
                        "sd3.5-medium-slg: 7,8,9); 'none' turns a recipe's off")
    g.add_argument("--slg-scale", type=_number(float), metavar="S", help="default 2.8 (diffusers'), recipe's if any")
    g.add_argument("--slg-start", type=_number(float), metavar="F", help="fraction of the steps (default 0.01)")
    g.add_argument("--slg-stop", type=_number(float), metavar="F", help="fraction of the steps (default 0.2)")
    g.add_argument("--height", type=parsed, metavar="PX", help=size_help)
    g.add_argument("--width", type=parsed, metavar="PX", help=size_help)
    g.add_argument("--batch-size", type=count, default=1, metavar="N", help="images per model call (default 1)")
    g = p.add_argument_group("image to edit")
    g.add_argument("--image", type=path, metavar="FILE", help="img2img from this image. Output size: the image's "
                   "(a multiple of 16 for SD3, else refused), or --height/--width, to which the image and mask "
                   "are resized (Lanczos, as diffusers)")
    g.add_argument("--mask", type=path, metavar="FILE", help="inpainting (needs --image): white = repaint, black = "
                   "keep; grayscale, of the image's size")
    g.add_argument("--strength", type=_number(float, low=None), metavar="F", help="(0, 1]: how much of the "
                   "schedule runs from the noised image (default 0.6 img2img, 1.0 inpainting)")
    control_flags.add_arguments(p, path)
    add_model_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=path, default=Path("outputs"), metavar="DIR", help="default: %(default)s")
    g.add_argument("--json", action="store_true", help="write a .json sidecar with the metadata of each image")
    g.add_argument("--overwrite", action="store_true", help="replace existing files (keeping their mode)")
    return p


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model flags, shared with flashsd3-serve (flashsd3/serve/cli.py)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", type=_expand, default=hub.SD3_MEDIUM_REPO, metavar="PATH|REPO",
                   help="diffusers folder, single .safetensors file, or hub repo id (default: %(default)s)")
    g.add_argument("--lora", type=_expand, action="append", metavar="SOURCE[:SCALE]",
                   help=f"repeatable; default {hub.FLASH_SD3_LORA_REPO}:1, 'none' for the base model; "
                        "with --demo only what is given")
    g.add_argument("--t5", action=argparse.BooleanOptionalAction, default=False, help="load the T5-XXL encoder")
    g.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto (default): fp16 on CUDA, bf16 "
                   "on a CPU with AMX-BF16 / AVX512-BF16 matrix units, fp32 on other CPUs")
    g.add_argument("--device", default="auto", metavar="DEV", help="auto (cuda if available, else cpu), cpu, cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    g.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    g.add_argument("--demo", action="store_true", help="random toy-width model, no download: noise-like images")


# Checks before any model is loaded or any folder created ----------------------------------------

def parse_lora(value: str, flag: str = "--lora") -> tuple[str, float]:
    """'src' or 'src:scale'. An existing path is never split, so 'C:\\loras\\x.safetensors' and
    'user/repo' stay whole; text after the last ':' without a path separator must be the scale."""
    head, sep, tail = value.rpartition(":")
    if not sep or not head or Path(value).exists() or "/" in tail or "\\" in tail:
        return value, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise UsageError(f"{flag} {value}: the scale {tail!r} is not a number (SOURCE or SOURCE:SCALE)") from None
    if not math.isfinite(scale):
        raise UsageError(f"{flag} {value}: the scale must be a finite number")
    return head, scale


def lora_list(values: list[str] | None, demo: bool) -> list[tuple[str, float]]:
    """None -> the Flash SD3 adapter (none for the demo); ['none'] -> [] (base model)."""
    if values is None:
        return [] if demo else [(hub.FLASH_SD3_LORA_REPO, 1.0)]
    if any(v.lower() == "none" for v in values):
        if len(values) > 1:
            raise UsageError("--lora none cannot be combined with other --lora values")
        return []
    loras = [parse_lora(v) for v in values]
    for source, _ in loras:
        check_source(source, "--lora")
    return loras


def check_source(source: str, flag: str) -> None:
    if not Path(source).exists() and not hub.looks_like_repo_id(source):
        raise UsageError(f"{flag} {source}: no such file or folder, and not a hub repo id (owner/name)")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first prompt
            lines = args.prompts_file.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompts-file {args.prompts_file} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                             f"offset {e.start}): save it as UTF-8") from None
        except OSError as e:
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


def check_inputs(args) -> Inputs:
    """Check prompts, sources, the image and mask, size, adapters and recipe; fill the size (the image's,
    or a default: small with --demo)."""
    prompts = read_prompts(args)
    if args.seed is not None:
        check_seed(args.seed, len(prompts) * args.num_images, "--seed")
    if not args.demo:
        check_source(args.model, "--model")
    loras = lora_list(args.lora, args.demo)
    config = model_config(args.model, args.demo)
    edit = load_edit(args)
    controls = control_flags.check_controls(args, [parse_lora(v, "--controlnet") for v in args.controlnet or []],
                                            config, edit)
    resized = args.height is not None
    args.height, args.width = control_flags.output_size(controls, edit, args.height, args.width, config)
    args.height, args.width = run_size(edit, args.height, args.width, config, DEMO_SIZE if args.demo else 1024)
    control_flags.check_sizes(controls, args.height, args.width, resized)
    check_loras(config, [source for source, _ in loras])
    recipe = run_recipe(args, config, bool(loras)) if config is not None else None
    if recipe is not None:
        check_schedule(recipe, edit)
        control_flags.check_windows(controls, recipe.steps, None if edit is None else edit.strength)
    return Inputs(loras, prompts, edit, recipe, controls)


def checked(ranks: Ranks, step):
    """Run step() on every rank; if any rank fails, rank 0 reports the lowest failing rank's message
    and every rank exits 2."""
    error, result = None, None
    try:
        result = step()
    except BAD_INPUT as e:
        error = str(e)
    failure = ranks.first_failure(error)
    if failure is None:
        return result
    if ranks.rank == 0:
        raise UsageError(f"[rank {failure[0]}] {failure[1]}" if ranks.world > 1 else failure[1])
    raise OtherRankFailed()


# Model and generation ---------------------------------------------------------------------------

def load_pipeline(args, loras, device, dtype: str, controls=()):
    import torch

    from .lora import load_lora, merge_lora
    from .pipeline import FlashSD3Pipeline
    from .weights import CheckpointError

    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        if args.demo:  # fixed weights (seed 0): --seed only picks the noise
            pipe = FlashSD3Pipeline.demo(seed=0, dtype=torch_dtype, device=device)
        else:
            pipe = FlashSD3Pipeline.from_pretrained(args.model, lora=[], t5=args.t5, dtype=torch_dtype, device=device)
        for k, (source, scale) in enumerate(loras):  # our names: two files called alike cannot clash
            load_lora(pipe.transformer, source, scale=scale, name=f"lora{k}")
        if loras:
            merge_lora(pipe.transformer, discard=True)  # the CLI never unmerges
        control_flags.load(pipe, controls, torch_dtype, device)
        check_size(pipe.transformer.config, args.height, args.width, vae_downscale=pipe.vae.downscale,
                   names=SIZE_FLAGS)  # a downloaded model's position table
    except hub.WeightsUnavailable as e:
        raise UsageError(weights_message(e, args.model)) from None
    except (CheckpointError, OSError) as e:
        raise UsageError(f"cannot load the weights: {e}") from None
    except InputError:  # the size against a downloaded model's position table: the rule's own message
        raise
    except ValueError as e:  # anything else the loaders refuse
        raise UsageError(f"cannot load the weights: {e}") from None
    if args.compile:
        pipe.transformer.compile(mode=args.compile_mode)  # in place: the module keeps its attributes
    return pipe


def weights_message(e: Exception, model: str) -> str:
    """The hub's message, the gating note for the hub's SD3 repo, and how to use local files instead."""
    msg = str(e).rstrip(".") + "."
    if hub.looks_like_repo_id(model) and "gated" not in msg:
        msg += (f" Note that SD3-medium ({hub.SD3_MEDIUM_REPO}) is gated: accept its license on the hub page, "
                f"then `hf auth login`.")
    return (msg + " For local files: --model /path/to/sd3-diffusers-folder or --model /path/to/sd3_medium_incl_clips"
            ".safetensors (and --lora /path/to/flash-sd3-folder, or --lora none).")


def generate(pipe, args, inputs: Inputs, plan: Plan, ranks: Ranks, meta: dict, negative: str | None) -> int:
    """This rank's batches, one model call each; each image's noise comes from its own seed."""
    from tqdm import tqdm

    mine, mode, edit = plan.count(args.batch_size, ranks.rank, ranks.world), new_file_mode(), inputs.edit
    bar = tqdm(total=mine, unit="img", desc=PROG, disable=None if ranks.rank == 0 else True)
    of = "" if edit else f"/{inputs.recipe.steps}"  # an edit runs the last part of the schedule (--strength)

    def step_note(i, x):
        bar.set_postfix_str(f"step {i + 1}{of}")

    with bar:
        for batch in plan.batches(args.batch_size, ranks.rank, ranks.world):
            images = call(pipe, edit, [j.prompt for j in batch], negative_prompt=negative, height=args.height,
                          width=args.width, recipe=inputs.recipe, seed=[j.seed for j in batch], callback=step_note,
                          **control_flags.call_arguments(inputs.controls))
            for job, image in zip(batch, images, strict=True):
                save_image(image, args.out, job, meta, overwrite=args.overwrite, sidecar=args.json, mode=mode)
                bar.update(1)
    return mine


def run_metadata(args, inputs: Inputs, dtype: str, negative: str | None) -> dict:
    """Settings shared by every image of the run (prompt, index and seed are added per image)."""
    return {"negative_prompt": negative or "", **metadata(inputs.recipe, inputs.edit),
            "width": args.width, "height": args.height,
            "model": "demo (random weights, flashsd3.config.DEMO)" if args.demo else args.model,
            "lora": [{"source": s, "scale": c} for s, c in inputs.loras], **control_flags.metadata(inputs.controls),
            "t5": args.t5, "dtype": dtype, "software": "flashsd3"}


def run_dtype(flag: str, device) -> tuple[str, str | None]:
    """(the dtype's name, a line saying why auto picked it, or None): --dtype auto resolves here, once."""
    from .precision import auto_dtype, describe_auto, short_name

    if flag != "auto":
        return flag, None
    return short_name(auto_dtype(device)), f"dtype {describe_auto(device)}"


def run(args, ranks: Ranks, device) -> int:
    say = print if ranks.rank == 0 else (lambda *a, **k: None)
    inputs = checked(ranks, lambda: check_inputs(args))
    prompts = inputs.prompts
    seed = args.seed if args.seed is not None else ranks.from_rank0(random.SystemRandom().randrange(2**31))
    plan = Plan(tuple(prompts), args.num_images, seed)
    checked(ranks, lambda: (check_seed(seed, plan.total, "--seed"),
                            check_out_dir(args.out, plan, args.overwrite, args.json)))
    dtype, dtype_note = run_dtype(args.dtype, device)
    sharded = f" over {ranks.world} ranks" if ranks.world > 1 else ""
    say(f"seed {seed}: image k uses seed + k ({plural(plan.total)}{sharded}, {dtype} on {device})")
    if dtype_note:
        say(dtype_note)
    if args.demo:
        say("note: --demo uses a random toy-width model: its images are noise-like by design", file=sys.stderr)
    if inputs.recipe is not None:
        say(describe(inputs.recipe))
    t0 = time.perf_counter()
    pipe = checked(ranks, lambda: load_pipeline(args, inputs.loras, device, dtype, inputs.controls))
    t1 = time.perf_counter()
    if inputs.recipe is None:  # a hub model: its config is known now
        inputs.recipe = checked(ranks, lambda: run_recipe(args, pipe.transformer.config, bool(inputs.loras)))
        checked(ranks, lambda: check_schedule(inputs.recipe, inputs.edit))
        say(describe(inputs.recipe))
    negative = args.negative_prompt if inputs.recipe.cfg else None
    if args.negative_prompt is not None and negative is None:
        say(f"note: --negative-prompt is ignored without guidance > 1 ({inputs.recipe.name} has "
            f"{inputs.recipe.guidance:g})", file=sys.stderr)
    count = generate(pipe, args, inputs, plan, ranks, run_metadata(args, inputs, dtype, negative), negative)
    done = ranks.gather((count, time.perf_counter() - t1))  # also waits for every rank
    total, seconds = sum(c for c, _ in done), max(s for _, s in done)
    say(f"wrote {plural(total)} to {args.out} in {seconds:.2f} s ({total / seconds:.2f} images/s; "
        f"model load {t1 - t0:.2f} s)")
    return 0


def plural(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message on one line, without advice for Python callers ("pass config= (or X)" -> "X"), cut
    (at a list separator when there is one) past `limit` characters."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    text = re.sub(r"; pass \w+= otherwise", "", re.sub(r"pass \w+= \(or ([^)]*)\)", r"\1", text))
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(", ", 1)[0] if ", " in text[:limit] else text[:limit]
    return f"{cut}, ... ({len(text) - len(cut)} more characters)"


def _warning_line(message, category, filename, lineno, line=None) -> str:
    return f"{PROG}: warning: {one_line(message)}\n"  # not Python's `file:line: UserWarning:` format


def main(argv: list[str] | None = None) -> int:
    reproducible_mkl()  # before anything imports torch
    keep_freed_memory()  # CPU: reuse freed activations instead of page-faulting them in again (no-op off glibc)
    args = build_parser().parse_args(argv)
    ranks, python_format = Ranks.from_env(), warnings.formatwarning
    warnings.formatwarning = _warning_line
    try:
        try:
            device = resolve_device(args.device, ranks.local_rank)
        except ValueError as e:
            raise UsageError(str(e)) from None
        ranks.start(device)
        code = run(args, ranks, device)
        ranks.close(synchronize=True)
        return code
    except OtherRankFailed:
        return 2
    except BAD_INPUT as e:
        where = f"[rank {ranks.rank}] " if ranks.world > 1 and not isinstance(e, UsageError) else ""
        print(f"{PROG}: error: {where}{one_line(e)}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # NaN/inf guard of the pipeline: say what to change, no traceback
        print(f"{PROG}: generation failed: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = python_format
        ranks.close()


if __name__ == "__main__":
    sys.exit(main())
