"""Training data for adapters: folder scan, captions, a skip summary, aspect-ratio buckets, crops, caches.

* **Sources**: a folder of images with same-name caption files (``cat.png`` + ``cat.txt``), or a
  ``metadata.jsonl`` with ``file_name`` and ``text`` per line (the Hugging Face ``imagefolder`` layout).
  An optional trigger word is prepended to every caption (``"sks, a photo of …"``).
* **Never a crash mid-run**: unreadable or corrupt images, missing or empty captions, bad metadata lines
  and images smaller than the target are skipped and counted in a :class:`DataSummary`.
* **Aspect-ratio buckets** (NovelAI 2022, "Improvements to Stable Diffusion"; the kohya-ss scheme): sides
  are multiples of ``step``, the area is at most ``resolution²``, the aspect ratio within ``max_aspect``.
  Each image goes to the bucket nearest its aspect ratio **among those it covers** — images are only ever
  downscaled, then centre- or randomly cropped to the bucket; an image that covers no bucket is skipped.
* **Order**: batches hold one bucket each; the order of an epoch is a pure function of (seed, epoch), so
  a resumed run sees exactly the batches an uninterrupted one would (:class:`BatchOrder`).
* **Caches**: latents (the VAE posterior mean and std of each image, and of its mirror image when flips
  are on; a training step samples ``mean + std · ε`` as with on-the-fly encoding) and text embeddings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import InvalidArgumentError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILE = "metadata.jsonl"
SKIP_REASONS = {
    "unreadable": "corrupt or unreadable image",
    "no_caption": "no caption file",
    "empty_caption": "empty caption",
    "too_small": "smaller than the training size",
    "bad_metadata": "metadata.jsonl line without file_name/text",
    "missing_file": "file named in metadata.jsonl not found",
    "failed_in_training": "could not be read again during training (replaced by another image)",
}
_EXAMPLES_PER_REASON = 5

Bucket = tuple[int, int]  # (width, height) in pixels


@dataclass
class Example:
    """One usable image: its path, caption (trigger included), size after EXIF rotation, and bucket."""

    path: Path
    caption: str
    width: int
    height: int
    bucket: Bucket


@dataclass
class DataSummary:
    """What the scan found, used and skipped (with up to 5 file names per reason)."""

    source: str
    found: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: dict[str, list[str]] = field(default_factory=dict)
    buckets: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        names = self.skipped_files.setdefault(reason, [])
        if len(names) < _EXAMPLES_PER_REASON:
            names.append(name)

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line: ``data: 198 of 200 images used (skipped: 1 corrupt or unreadable image, …)``."""
        head = f"data: {self.used} of {self.found} images used"
        if not self.skipped:
            return head
        parts = [f"{n} {SKIP_REASONS.get(r, r)}" for r, n in sorted(self.skipped.items())]
        return f"{head} (skipped: {', '.join(parts)})"


# --------------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect: float = 2.0, enabled: bool = True) -> list[Bucket]:
    """Bucket sizes ``(w, h)``: sides multiples of ``step``, ``w·h ≤ resolution²``, aspect within
    ``max_aspect``; for every width the tallest such height (and the square one). Without bucketing,
    the single square bucket ``resolution``×``resolution`` (rounded down to ``step``)."""
    side = max(step, resolution // step * step)
    if not enabled:
        return [(side, side)]
    area = resolution * resolution
    buckets = {(side, side)}
    width = step
    while width <= area // step:
        height = min(area // width // step * step, resolution * 4)
        if height >= step and max(width / height, height / width) <= max_aspect + 1e-9:
            buckets.add((width, height))
        width += step
    return sorted(buckets)


def choose_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket | None:
    """The bucket nearest the image's aspect ratio (in log ratio) among those the image covers without
    upscaling (``bw ≤ width`` and ``bh ≤ height``); ``None`` when it covers none. Ties: the larger area."""
    fits = [b for b in buckets if b[0] <= width and b[1] <= height]
    if not fits:
        return None
    ratio = math.log(width / height)
    return min(fits, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def cover_size(size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """``(w, h)`` of an image of ``size`` downscaled (never up) to the smallest size covering ``bucket``."""
    bw, bh = bucket
    scale = max(bw / size[0], bh / size[1])
    if scale > 1.0 + 1e-9:
        raise ValueError(f"image {size} is smaller than bucket {bucket}")
    if scale >= 1.0 - 1e-9:
        return size
    return max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))


def resize_to_cover(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Downscale ``image`` (never up) to the smallest size that covers ``bucket``."""
    size = cover_size(image.size, bucket)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def crop_offsets(size: tuple[int, int], bucket: Bucket, mode: str, generator: torch.Generator | None):
    """Top-left corner of the crop: centred, or uniform over the valid offsets (``generator``)."""
    dx, dy = size[0] - bucket[0], size[1] - bucket[1]
    if mode == "random" and generator is not None:
        x = int(torch.randint(0, dx + 1, (1,), generator=generator)) if dx else 0
        y = int(torch.randint(0, dy + 1, (1,), generator=generator)) if dy else 0
        return x, y
    return dx // 2, dy // 2


def prepare_pixels(
    image: Image.Image, bucket: Bucket, *, crop: str, flip: bool, generator: torch.Generator | None = None
) -> np.ndarray:
    """``uint8 [h, w, 3]``: downscale to cover, crop to the bucket, optionally mirror left-right."""
    return prepare_pixels_placed(image, bucket, crop=crop, flip=flip, generator=generator)[0]


def prepare_pixels_placed(
    image: Image.Image, bucket: Bucket, *, crop: str, flip: bool, generator: torch.Generator | None = None
) -> tuple[np.ndarray, list[int]]:
    """:func:`prepare_pixels` and the example's SDXL micro-conditioning (:func:`micro_conditioning`)."""
    covered = resize_to_cover(image, bucket)
    x, y = crop_offsets(covered.size, bucket, crop, generator)
    out = covered.crop((x, y, x + bucket[0], y + bucket[1]))
    if flip:
        out = ImageOps.mirror(out)
    return np.array(out, dtype=np.uint8), micro_conditioning(image.size, covered.size, (x, y), bucket, flip)


def micro_conditioning(
    original: tuple[int, int], covered: tuple[int, int], offset: tuple[int, int], bucket: Bucket, flip: bool
) -> list[int]:
    """SDXL's size/crop conditioning of one training example (Podell et al. 2023, §2.2):
    ``(h_orig, w_orig, c_top, c_left, h_bucket, w_bucket)`` — the crop corner in the downscaled image's
    pixels; mirrored images count their left crop from the mirrored side. Sizes are ``(w, h)``."""
    from ..sampling.conditioning import sdxl_time_ids

    x, y = offset
    if flip:
        x = covered[0] - x - bucket[0]
    return sdxl_time_ids((original[1], original[0]), (y, x), (bucket[1], bucket[0]))


def centre_crop_conditioning(example: Example, flip: bool) -> list[int]:
    """:func:`micro_conditioning` of an example's centre crop (what the latent cache encodes)."""
    covered = cover_size((example.width, example.height), example.bucket)
    offset = crop_offsets(covered, example.bucket, "center", None)
    return micro_conditioning((example.width, example.height), covered, offset, example.bucket, flip)


# --------------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------------


def load_image(path: Path) -> Image.Image:
    """Fully decode ``path`` as RGB, EXIF rotation applied (raises on a corrupt or truncated file)."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))
            rgba = image.convert("RGBA")
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")


_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def probe_image(path: Path) -> tuple[int, int]:
    """Width and height after EXIF rotation, checking that the whole file decodes (JPEGs at 1/8 scale
    through ``draft``, which still reads every byte): raises on a corrupt or truncated file."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
        image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        image.load()
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def with_trigger(caption: str, trigger: str | None) -> str:
    """``"trigger, caption"`` (kohya-ss style); unchanged when it already starts with the trigger."""
    caption = caption.strip()
    if not trigger:
        return caption
    trigger = trigger.strip()
    if caption == trigger or caption.startswith((f"{trigger},", f"{trigger} ")):
        return caption
    return f"{trigger}, {caption}"


def _read_caption(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _candidates(data_dir: Path, caption_ext: str, summary: DataSummary) -> list[tuple[Path, str | None]]:
    """``(image path, caption or None)`` from metadata.jsonl, or from same-name caption files."""
    metadata = data_dir / METADATA_FILE
    if metadata.is_file():
        out = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                name, text = record["file_name"], record["text"]
                if not isinstance(name, str) or not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                summary.found += 1
                summary.skip("bad_metadata", f"{METADATA_FILE}:{number}")
                continue
            out.append((data_dir / name, text))
        return out
    images = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return [
        (p, _read_caption(p.with_suffix(caption_ext)) if p.with_suffix(caption_ext).is_file() else None)
        for p in images
    ]


def scan_dataset(
    data_dir: str | Path,
    buckets: Sequence[Bucket],
    *,
    trigger: str | None = None,
    caption_ext: str = ".txt",
) -> tuple[list[Example], DataSummary]:
    """Every usable image of ``data_dir`` with its caption and bucket, and the summary of what was
    skipped (never raises for a bad file; raises :class:`InvalidArgumentError` when no image is usable)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise InvalidArgumentError(
            f"training data folder {data_dir} does not exist",
            "pass a folder of images with same-name .txt captions (or a metadata.jsonl)",
        )
    source = METADATA_FILE if (data_dir / METADATA_FILE).is_file() else f"{caption_ext} captions"
    summary = DataSummary(source=source)
    examples = []
    for path, caption in _candidates(data_dir, caption_ext, summary):
        summary.found += 1
        name = str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else str(path)
        if not path.is_file():
            summary.skip("missing_file", name)
            continue
        if caption is None:
            summary.skip("no_caption", name)
            continue
        if not caption.strip():
            summary.skip("empty_caption", name)
            continue
        try:
            width, height = probe_image(path)
        except Exception:  # any decoder error means: skip this file, count it
            summary.skip("unreadable", name)
            continue
        bucket = choose_bucket(width, height, buckets)
        if bucket is None:
            summary.skip("too_small", name)
            continue
        examples.append(Example(path, with_trigger(caption, trigger), width, height, bucket))
        key = f"{bucket[0]}x{bucket[1]}"
        summary.buckets[key] = summary.buckets.get(key, 0) + 1
    summary.used = len(examples)
    if not examples:
        smallest = min(buckets, key=lambda b: b[0] * b[1])
        raise InvalidArgumentError(
            f"no usable training image in {data_dir} — {summary.describe()}",
            f"images need a non-empty caption and at least {smallest[0]}×{smallest[1]} pixels "
            "(or lower --resolution)",
        )
    return examples, summary


def dataset_fingerprint(examples: Sequence[Example]) -> str:
    """SHA-256 (16 hex digits) over every example's path, size on disk, mtime, caption and bucket."""
    digest = hashlib.sha256()
    for e in examples:
        stat = e.path.stat()
        digest.update(json.dumps([str(e.path), stat.st_size, stat.st_mtime_ns, e.caption, e.bucket]).encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# batch order
# --------------------------------------------------------------------------------------------------


class BatchOrder:
    """The batches of each epoch, a pure function of ``(seed, epoch)``: images shuffled within their
    bucket, chunked into batches of ``batch_size`` (the last one of a bucket may be smaller), batches
    shuffled. With several processes, each takes every ``num_processes``-th batch of the same list (the
    list cut to a multiple of ``num_processes``), so all take the same number of steps."""

    def __init__(
        self,
        buckets: Sequence[Bucket],
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        if len(self._all_batches(0)) < num_processes:
            raise InvalidArgumentError(
                f"{len(self._all_batches(0))} batches per epoch for {num_processes} processes",
                "use more images, a smaller batch size or fewer processes",
            )

    def _all_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(groups):
            members = rng.permutation(groups[bucket]).tolist()
            batches += [members[k : k + self.batch_size] for k in range(0, len(members), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def epoch(self, epoch: int) -> list[list[int]]:
        batches = self._all_batches(epoch)
        usable = len(batches) // self.num_processes * self.num_processes
        return batches[self.process_index : usable : self.num_processes]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))


# --------------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------------


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [B, h, w, 3]`` → float ``[B, 3, h, w]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def encode_posterior(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std (float32, on the CPU) of ``pixels`` ``[B, 3, h, w]`` in [-1, 1]."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, generator) -> torch.Tensor:
    """``(mean + std · ε) · scaling_factor``, ε from ``generator`` — a posterior sample scaled as SD does."""
    eps = torch.randn(mean.shape, generator=generator)
    return (mean + std * eps) * scaling_factor


@dataclass
class LatentCache:
    """Posterior mean and std per example (and per mirrored example when flips are on)."""

    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    mean_flipped: list[torch.Tensor] | None = None
    std_flipped: list[torch.Tensor] | None = None

    def get(self, index: int, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if flipped and self.mean_flipped is not None:
            return self.mean_flipped[index], self.std_flipped[index]
        return self.mean[index], self.std[index]


def _load_for_cache(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except Exception as error:  # changed or removed since the scan a moment ago
        raise InvalidArgumentError(
            f"{path} could not be read while caching latents ({error}), though the scan read it",
            "restore or remove the file and start again",
        ) from None


def build_latent_cache(
    vae,
    examples: Sequence[Example],
    *,
    flips: bool,
    cache_file: Path | None,
    key: str,
    batch: int = 16,
    log=None,
) -> LatentCache:
    """Encode every example once (centre crop; mirrored too when ``flips``), reusing ``cache_file``
    (safetensors, header ``key``) when it was written for the same data, model and settings."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    variants = ("", "flip.") if flips else ("",)
    if cache_file is not None and cache_file.is_file():
        with safe_open(str(cache_file), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no items()
                n = len(examples)
                get = lambda v, what: [t[f"{v}{what}.{i}"] for i in range(n)]  # noqa: E731
                if log:
                    log(f"latent cache: reused {cache_file}")
                return LatentCache(
                    get("", "mean"),
                    get("", "std"),
                    *((get("flip.", "mean"), get("flip.", "std")) if flips else ()),
                )
    tensors: dict[str, torch.Tensor] = {}
    by_bucket: dict[Bucket, list[int]] = {}
    for i, e in enumerate(examples):
        by_bucket.setdefault(e.bucket, []).append(i)
    for bucket, members in sorted(by_bucket.items()):
        for start in range(0, len(members), batch):
            chunk = members[start : start + batch]
            images = [_load_for_cache(examples[i].path) for i in chunk]
            for variant in variants:
                pixels = np.stack(
                    [prepare_pixels(im, bucket, crop="center", flip=bool(variant)) for im in images]
                )
                mean, std = encode_posterior(vae, pixels_to_tensor(pixels))
                for j, i in enumerate(chunk):
                    tensors[f"{variant}mean.{i}"] = mean[j].contiguous()
                    tensors[f"{variant}std.{i}"] = std[j].contiguous()
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": key})
        tmp.replace(cache_file)
    n = len(examples)
    mean = [tensors[f"mean.{i}"] for i in range(n)]
    std = [tensors[f"std.{i}"] for i in range(n)]
    if flips:
        return LatentCache(
            mean,
            std,
            [tensors[f"flip.mean.{i}"] for i in range(n)],
            [tensors[f"flip.std.{i}"] for i in range(n)],
        )
    return LatentCache(mean, std)
