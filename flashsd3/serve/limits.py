"""The server's caps, each a flag with a default; what exceeds one is answered with a 4xx naming the flag."""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 1024  # output width x height (1024x2048, 1440x1440)
    max_images: int = 4  # images per request (OpenAI `n`, A1111 batch_size x n_iter)
    max_steps: int = 60  # sampler steps (SD3.5-medium's recipe runs 50)
    max_body: int = 24 * 2**20  # request body bytes (413 beyond): base64 PNG uploads are ~4/3 their size
    max_upload_pixels: int = 4096 * 4096  # an uploaded image's header size, checked before it is decoded
    max_prompt: int = 2000  # characters of a prompt or negative prompt (CLIP reads 77 tokens of it)
    max_queue: int = 16  # requests waiting (429 with Retry-After beyond)
    max_batch: int = 4  # images per model call when requests are batched together
    max_controlnets: int = 4  # ControlNets in one request (each runs at every step it acts on)
    timeout: float = 300.0  # seconds from acceptance to the answer (408 beyond; a queued request is dropped)


def add_limit_arguments(p: argparse.ArgumentParser, positive) -> None:
    d = Limits()
    g = p.add_argument_group("limits (each answered with a 4xx and a message naming the flag)")
    g.add_argument("--max-batch", type=positive, default=d.max_batch, metavar="N",
                   help="images per model call; compatible requests (size, recipe, LoRAs) are batched up to it. "
                        "1: every image alone, bytes equal to flashsd3-sample's (default %(default)s)")
    g.add_argument("--max-queue", type=positive, default=d.max_queue, metavar="N",
                   help="requests waiting; more get 429 + Retry-After (default %(default)s)")
    g.add_argument("--max-pixels", type=positive, default=d.max_pixels, metavar="N",
                   help="width x height of an output image (default %(default)s)")
    g.add_argument("--max-images", type=positive, default=d.max_images, metavar="N",
                   help="images per request (default %(default)s)")
    g.add_argument("--max-steps", type=positive, default=d.max_steps, metavar="N", help="default %(default)s")
    g.add_argument("--max-body-mb", type=positive, default=d.max_body // 2**20, metavar="MB",
                   help="request body size, 413 beyond (default %(default)s)")
    g.add_argument("--max-upload-pixels", type=positive, default=d.max_upload_pixels, metavar="N",
                   help="an uploaded image's width x height, read from its header before decoding "
                        "(default %(default)s)")
    g.add_argument("--max-prompt-chars", type=positive, default=d.max_prompt, metavar="N",
                   help="characters of a prompt (default %(default)s)")
    g.add_argument("--max-controlnets", type=positive, default=d.max_controlnets, metavar="N",
                   help="ControlNets one request may use (default %(default)s)")
    g.add_argument("--timeout", type=positive, default=int(d.timeout), metavar="S",
                   help="seconds a request may take from acceptance, 408 beyond (default %(default)s)")


def limits_from(args) -> Limits:
    return Limits(max_pixels=args.max_pixels, max_images=args.max_images, max_steps=args.max_steps,
                  max_body=args.max_body_mb * 2**20, max_upload_pixels=args.max_upload_pixels,
                  max_prompt=args.max_prompt_chars, max_queue=args.max_queue, max_batch=args.max_batch,
                  max_controlnets=args.max_controlnets, timeout=float(args.timeout))
