"""Scoring generated toy images: a classifier for prompt adherence and a Frechet distance in its features.

The classifier is a small CNN trained on fresh procedural data; it reads each attribute (shape, colour,
position) from an image. Adherence = the fraction of samples whose three attributes all match the prompt.
Its 128-d penultimate activations are the feature space of the Frechet distance (the FID recipe, Heusel et
al. 2017, with this toy's own network in place of Inception): FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2),
computed in float64.

Two per-sample measures sit beside them: `paired_l2`, the per-pixel mean squared difference to the reference
sample made from the same starting noise (how closely a sampler reproduces the reference, sample by sample),
and `mean_chroma`, a saturation measure (see its docstring) that shows guidance pushing colours away from grey.

`ToyEvaluator` fixes the evaluation set once (prompts, starting noise, held-out data and its features) so
every row of a results table is scored on the same prompts and the same noise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..rng import offset_generator, seeded
from .data import ATTRIBUTES, balanced_labels, make_dataset, random_labels, render

FEATURE_DIM = 128
ATTRIBUTE_NAMES = ("shape", "colour", "position")


class ToyClassifier(nn.Module):
    """(B, 3, 16, 16) images in [-1, 1] -> features (B, 128) and logits per attribute."""

    def __init__(self, resolution: int = 16):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 32, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(64 * (resolution // 4) ** 2, FEATURE_DIM)  # flattened: keeps where things are
        self.heads = nn.ModuleList(nn.Linear(FEATURE_DIM, len(values)) for values in ATTRIBUTES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(self.conv(images).flatten(1)))  # (B, 128)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.features(images)
        return feats, [head(feats) for head in self.heads]


def augmented_batch(n: int, generator: torch.Generator, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural images as a generator may draw them: half with hard aliased edges, a random blur and pixel
    noise, so the classifier reads the shape rather than the renderer's exact anti-aliasing. Measured on the
    seed-0 teacher: a 500-step classifier without this read 42 of 80 of its circles as squares (the grid
    shows circles); 1000 steps with it read all 240 checked CFG samples as prompted, and 100% of held-out data."""
    labels = random_labels(n, generator)
    h = n // 2
    images = torch.cat([render(labels[:h], generator, resolution, supersample=1),
                        render(labels[h:], generator, resolution)])
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = images + 0.5 * torch.rand(n, 1, 1, 1, generator=generator) * (blurred - images)
    amount = 0.08 * torch.rand(n, 1, 1, 1, generator=generator)  # drawn before the noise, as always
    images = images + amount * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), labels


def train_classifier(seed: int, *, steps: int = 800, batch: int = 128, lr: float = 2e-3,
                     resolution: int = 16) -> ToyClassifier:
    """Train on fresh augmented procedural batches (AdamW, cosine decay); returns the classifier in eval mode."""
    with seeded(seed):
        model = ToyClassifier(resolution)
    gen = offset_generator(seed, 7919)  # its own data stream, not the teacher's
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        images, labels = augmented_batch(batch, gen, resolution)
        _, logits = model(images)
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def classify(classifier: ToyClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features (N, 128) float32, predicted labels (N, 3))."""
    feats, preds = [], []
    for chunk in images.split(batch):
        f, logits = classifier(chunk.float())
        feats.append(f)
        preds.append(torch.stack([lg.argmax(1) for lg in logits], dim=1))
    return torch.cat(feats), torch.cat(preds)


def accuracies(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy and `adherence` (all three right), as fractions."""
    right = pred == labels
    out = {f"{name}_acc": right[:, i].float().mean().item() for i, name in enumerate(ATTRIBUTE_NAMES)}
    out["adherence"] = right.all(1).float().mean().item()
    return out


def gaussian_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features, in float64."""
    x = feats.detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got {tuple(x.shape)}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), float64.

    tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix with the same
    eigenvalues as S1 S2; symmetric eigensolvers avoid the complex parts scipy's sqrtm can return.
    """
    mu1, s1, mu2, s2 = (t.to(torch.float64) for t in (mu1, s1, mu2, s2))
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return (diff @ diff + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def paired_l2(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-pixel mean squared difference to the reference sample made from the same
    starting noise (images and reference (N, C, H, W), row i of both from noise i)."""
    if images.shape != reference.shape:
        raise ValueError(f"paired_l2 needs images shaped like the reference {tuple(reference.shape)}, "
                         f"got {tuple(images.shape)}")
    return ((images.float() - reference.float()) ** 2).flatten(1).mean(1).mean().item()


def mean_chroma(images: torch.Tensor) -> float:
    """Saturation: the mean over pixels of the chroma max(R, G, B) - min(R, G, B) (HSV's C), in the images'
    [-1, 1] units after clamping to that range (what is displayed; 2x the chroma of [0, 1] colours).

    Why this measure: classifier-free guidance pushes samples along v_cond - v_uncond, and on this toy that
    moves colours away from the grey background towards the fully saturated palette (measured on the seed-0
    teacher: held-out data 0.35, the CFG-3 reference higher, CFG 5 higher still), while the shapes' size and
    the grey level barely change. Grey pixels contribute 0, so it reads "how much colour" without a classifier.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"mean_chroma needs RGB images (N, 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(-1, 1)
    return (x.amax(1) - x.amin(1)).mean().item()


@dataclass
class EvalSet:
    """The fixed evaluation set: prompts, starting noise, held-out data (two independent draws)."""

    labels: torch.Tensor  # (N, 3) balanced over the 48 captions
    noise: torch.Tensor  # (N, 3, R, R) starting noise for every sampler row
    data: torch.Tensor  # (N, 3, R, R) held-out real images of the same prompts' distribution
    data_labels: torch.Tensor
    floor: torch.Tensor  # a second held-out draw: the FD between two data samples (the noise floor)
    floor_labels: torch.Tensor


def make_eval_set(n: int = 2000, resolution: int = 16, seed: int = 2024) -> EvalSet:
    """Fixed seeds, independent of the training seed, so runs with different --seed compare."""
    noise = torch.randn(n, 3, resolution, resolution, generator=offset_generator(seed))
    data, data_labels = make_dataset(n, seed + 1, resolution)
    floor, floor_labels = make_dataset(n, seed + 2, resolution)
    return EvalSet(balanced_labels(n), noise, data, data_labels, floor, floor_labels)


class ToyEvaluator:
    """Scores (N, 3, R, R) generated images for the eval set's prompts: adherence, accuracies, fd_data, fd_ref."""

    def __init__(self, classifier: ToyClassifier, eval_set: EvalSet):
        self.classifier, self.eval_set = classifier, eval_set
        self.data_feats, _ = classify(classifier, eval_set.data)
        self.data_stats = gaussian_stats(self.data_feats)
        self.ref_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.reference: torch.Tensor | None = None

    def set_reference(self, images: torch.Tensor) -> None:
        """The reference samples (the teacher's many-step CFG from the eval set's noise) that `fd_ref` and
        `paired_l2` compare against."""
        self.ref_stats = gaussian_stats(classify(self.classifier, images)[0])
        self.reference = images

    def score(self, images: torch.Tensor, labels: torch.Tensor | None = None, *,
              paired: bool = False) -> dict[str, float]:
        """Accuracies, adherence, fd_data, fd_ref (nan before set_reference), mean_chroma; paired=True (images
        made from the eval set's noise, row i from noise i) adds paired_l2 to the reference."""
        labels = self.eval_set.labels if labels is None else labels
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images for {labels.shape[0]} prompts")
        feats, pred = classify(self.classifier, images)
        stats = gaussian_stats(feats)
        out = accuracies(pred, labels)
        out["fd_data"] = frechet_distance(*stats, *self.data_stats)
        out["fd_ref"] = frechet_distance(*stats, *self.ref_stats) if self.ref_stats is not None else float("nan")
        out["mean_chroma"] = mean_chroma(images)
        if paired:
            if self.ref_stats is None:
                raise ValueError("paired_l2 needs the reference: call set_reference first")
            out["paired_l2"] = paired_l2(images, self.reference)
        out["num_samples"] = int(images.shape[0])
        return out

    def recipe_row(self, images: torch.Tensor, *, recipe: str, seed: int, steps: int,
                   sampler: str) -> tuple[str, dict]:
        """(`row_key(recipe, seed, steps)`, the row) for a student's images from the eval set's noise by `sampler`
        (flash, or flash_initial): every metric of `score(paired=True)` plus what identifies the row."""
        key = row_key(recipe, seed, steps)
        row = {**self.score(images, paired=True), "recipe": recipe, "seed": seed, "steps": steps, "nfe": steps,
               "guidance": 0.0, "sampler": sampler}
        return key, row


ROW_METRICS = ("adherence", "fd_data", "fd_ref", "paired_l2", "mean_chroma")  # every recipe row has these
_ROW_KEY = re.compile(r"([a-z0-9][a-z0-9-]*)_seed(\d+)_(\d+)step")


def row_key(recipe: str, seed: int, steps: int) -> str:
    """The results.json key of a recipe's student row: `<recipe>_seed<S>_<N>step`, e.g. `distill_seed1_4step`."""
    key = f"{recipe}_seed{seed}_{steps}step"
    if _ROW_KEY.fullmatch(key) is None or steps < 1:
        raise ValueError(f"recipe row needs a lower-case recipe name (letters, digits, '-'), a seed >= 0 and "
                         f"steps >= 1, got recipe={recipe!r} seed={seed} steps={steps}")
    return key


def parse_row_key(key: str) -> tuple[str, int, int] | None:
    """`distill_seed1_4step` -> ("distill", 1, 4); None for any other key (the teacher rows, `_meta`)."""
    m = _ROW_KEY.fullmatch(key)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def save_classifier(classifier: ToyClassifier, path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))


def load_classifier(path: str | Path, resolution: int = 16) -> ToyClassifier:
    if not Path(path).is_file():
        raise FileNotFoundError(f"toy classifier file not found: {path}")
    model = ToyClassifier(resolution)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
