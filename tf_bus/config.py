"""Typed configuration: the single source of truth for every stage.

Each stage takes one of these dataclasses; the CLI only overrides fields, and the
config that was used is saved next to the stage's outputs (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Class names of the BUSI release, in label-index order (benign=0, malignant=1, normal=2).
CLASS_NAMES: tuple[str, ...] = ("benign", "malignant", "normal")

#: Split names as used in ``splits.json`` and the classification layout.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Segmentation layout folder names, as the original pipeline used them:
#: split -> (images dir, masks dir).
SEGMENTATION_DIRS: dict[str, tuple[str, str]] = {
    "train": ("train_images/train", "train_masks/train"),
    "validation": ("val_images/Val", "val_masks/Val"),
    "test": ("test_images/test", "test_masks/test"),
}

#: Image file extensions that both PIL and ``tf.io.decode_image`` read.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


#: The U-Net's training losses by name (``tf_bus.models.losses.get_loss``).
SEGMENTATION_LOSSES = ("bce", "dice", "bce_dice", "focal_tversky", "boundary_bce_dice")


def check_unet_arguments(*, image_size: tuple, channels: int, depth: int, base_filters: int, upsampling: str,
                         padding: str, transformer_blocks: int = 0, transformer_heads: int = 4) -> None:
    """Checks the U-Net's arguments without building it (``ConfigError``, a ``ValueError``,
    naming the argument). ``tf_bus.models.unet.UNet`` and ``SegmenterConfig`` both call it, so a
    bad ``--image-size`` for ``--depth`` fails before a run folder is made."""
    if channels not in (1, 3):
        raise ConfigError(f"`channels` must be 1 or 3. Received: channels={channels}")
    if depth < 1:
        raise ConfigError(f"`depth` must be >= 1. Received: depth={depth}")
    if base_filters < 1:
        raise ConfigError(f"`base_filters` must be >= 1. Received: base_filters={base_filters}")
    if transformer_blocks < 0:
        raise ConfigError(f"`transformer_blocks` must be >= 0. Received: transformer_blocks={transformer_blocks}")
    if transformer_blocks and (transformer_heads < 1 or (base_filters * 2 ** depth) % transformer_heads):
        raise ConfigError(
            f"`transformer_heads` must divide the bottleneck's base_filters * 2**depth = {base_filters * 2 ** depth} "
            f"channels. Received: transformer_heads={transformer_heads}"
        )
    if upsampling not in ("transpose", "resize"):
        raise ConfigError(f"`upsampling` must be 'transpose' or 'resize'. Received: upsampling={upsampling!r}")
    if padding not in ("same", "valid"):
        raise ConfigError(f"`padding` must be 'same' or 'valid'. Received: padding={padding!r}")
    if padding == "valid" and None in image_size:
        raise ConfigError(f"padding='valid' needs a static image_size. Received: image_size={image_size}")
    if padding == "same" and None not in image_size and any(s % 2 ** depth for s in image_size):
        raise ConfigError(
            f"With padding='same', image_size must be divisible by 2**depth={2 ** depth}. "
            f"Received: image_size={image_size}"
        )


def check_deep_supervision(levels: int, *, depth: int, padding: str) -> None:
    """Checks ``--deep-supervision`` against the U-Net (``ConfigError``, a ``ValueError``).
    ``SegmenterConfig`` and ``tf_bus.models.unet.DeepSupervision`` both call it."""
    if not 0 <= levels < depth:
        raise ConfigError(f"`deep_supervision` must be 0 (off) or within 1..depth-1 = 1..{depth - 1}. "
                          f"Received: deep_supervision={levels}")
    if levels and padding != "same":
        raise ConfigError("`deep_supervision` needs padding='same' (its targets are the mask pooled by powers of 2). "
                          f"Received: padding={padding!r}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"`{name}` must be within [0, 1]. Received: {name}={value!r}")


@dataclass
class SplitConfig:
    """Group-aware, class-stratified train/validation/test split.

    Args:
        train: fraction of cases (per class) for training.
        validation: fraction for validation.
        test: fraction for test.
        seed: seed of the (deterministic) assignment.
    """

    train: float = 0.70
    validation: float = 0.15
    test: float = 0.15
    seed: int = 1337

    def __post_init__(self) -> None:
        for name in SPLITS:
            _check_fraction(name, getattr(self, name))
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                "Split fractions must add up to 1. Received: "
                f"train={self.train}, validation={self.validation}, test={self.test} "
                f"(sum {total:.4f})"
            )

    def fractions(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLITS}


@dataclass
class DuplicateConfig:
    """Exact and near-duplicate detection.

    Two images are near-duplicates (another frame of the same lesion, the same frame
    with other calipers) when their grey thumbnails correlate at ``near_threshold``
    or above AND their high-passed thumbnails (thumbnail minus its Gaussian blur of
    radius ``detail_blur``) correlate at ``detail_threshold`` or above. The first test
    alone confuses unrelated ultrasound frames (they share the same dark-bottom
    layout); the second alone chains unrelated images through caliper marks.
    Calibrated on real BUSI: see README "Duplicates".

    Args:
        thumb_size: side of the grey thumbnails.
        near_threshold: minimum correlation of the thumbnails.
        detail_threshold: minimum correlation of the high-passed thumbnails.
        detail_blur: Gaussian radius (thumbnail pixels) removed by the high-pass.
    """

    thumb_size: int = 32
    near_threshold: float = 0.90
    detail_threshold: float = 0.45
    detail_blur: float = 4.0

    def __post_init__(self) -> None:
        if self.thumb_size < 4:
            raise ConfigError(f"`thumb_size` must be >= 4. Received: thumb_size={self.thumb_size}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ConfigError(
                "`near_threshold` must be within (0, 1]. "
                f"Received: near_threshold={self.near_threshold}"
            )


@dataclass
class BalanceConfig:
    """Class balancing of the classification train split.

    Args:
        method: ``"augment"`` writes augmented copies of the minority classes into the
            train split only (validation and test are never touched); ``"none"`` leaves
            the split as it is (use class weights or balanced sampling in the loader).
        seed: seed of the augmentations.
    """

    method: str = "augment"
    seed: int = 7

    def __post_init__(self) -> None:
        if self.method not in ("augment", "none"):
            raise ConfigError(
                "`balance` must be 'augment' or 'none'. "
                f"Received: balance={self.method!r}"
            )


@dataclass
class PrepareConfig:
    """`tf-bus prepare`: read the release, split it, write both layouts."""

    split: SplitConfig = field(default_factory=SplitConfig)
    duplicates: DuplicateConfig = field(default_factory=DuplicateConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    skip_bad: bool = False
    workers: int = 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrepareConfig":
        return cls(
            split=SplitConfig(**d.get("split", {})),
            duplicates=DuplicateConfig(**d.get("duplicates", {})),
            balance=BalanceConfig(**d.get("balance", {})),
            skip_bad=d.get("skip_bad", False),
            workers=d.get("workers", 4),
        )


#: S3's additional checksum algorithms that botocore computes without extra packages.
CHECKSUM_ALGORITHMS = ("CRC32", "CRC32C", "SHA1", "SHA256")


@dataclass
class StageConfig:
    """`tf-bus stage`: moving the release and the prepared layouts through S3 with boto3.

    Credentials, profile and region come from boto3's usual chain (environment,
    ``~/.aws/config`` and ``credentials``, instance roles); they are never flags.

    Args:
        endpoint_url: an S3-compatible endpoint (MinIO, Ceph, Swift s3api); ``None`` reads
            ``AWS_ENDPOINT_URL`` (then AWS itself).
        profile: a named profile of ``~/.aws/config``; ``None`` uses ``AWS_PROFILE``/default.
        region: the region; ``None`` uses the profile's or ``AWS_REGION``.
        max_attempts: attempts per request, retried with backoff by botocore.
        retry_mode: botocore's retry mode (``standard`` or ``adaptive``).
        connect_timeout: seconds to open a connection.
        read_timeout: seconds to wait for data on an open connection.
        max_concurrency: parallel files (publish/download) and parts (multipart).
        multipart_threshold_mb: files at least this large go up in parts.
        multipart_chunk_mb: the part size (S3 requires >= 5 MiB except the last part).
        max_unzip_mb: refuse a zip whose members add up to more than this.
        max_unzip_ratio: refuse a member that expands more than this many times (zip bombs).
        cache_dir: where `s3://` training data is staged; ``None`` reads ``TF_BUS_CACHE``,
            then ``~/.cache/tf-bus``.
        checksum_algorithm: also send S3's additional checksum (``x-amz-checksum-*``:
            CRC32, CRC32C, SHA1 or SHA256) with every upload, and have botocore validate
            the stored checksum on every download. ``None``: Content-MD5/ETag only, which
            every S3-compatible store supports.
    """

    endpoint_url: str | None = None
    profile: str | None = None
    region: str | None = None
    max_attempts: int = 5
    retry_mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_concurrency: int = 8
    multipart_threshold_mb: int = 16
    multipart_chunk_mb: int = 8
    max_unzip_mb: int = 8192
    max_unzip_ratio: float = 200.0
    cache_dir: str | None = None
    checksum_algorithm: str | None = None

    def __post_init__(self) -> None:
        if self.checksum_algorithm is not None and self.checksum_algorithm not in CHECKSUM_ALGORITHMS:
            raise ConfigError(f"`checksum_algorithm` must be one of {', '.join(CHECKSUM_ALGORITHMS)} or None. "
                              f"Received: checksum_algorithm={self.checksum_algorithm!r}")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"`endpoint_url` must start with http:// or https://. Received: endpoint_url={self.endpoint_url!r}"
            )
        for name in ("max_attempts", "max_concurrency", "max_unzip_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)!r}")
        if self.retry_mode not in ("standard", "adaptive", "legacy"):
            raise ConfigError(f"`retry_mode` must be standard, adaptive or legacy. Received: {self.retry_mode!r}")
        if self.multipart_chunk_mb < 5:
            raise ConfigError(
                f"`multipart_chunk_mb` must be >= 5 (S3's smallest part). Received: {self.multipart_chunk_mb!r}"
            )
        if self.multipart_threshold_mb < self.multipart_chunk_mb:
            raise ConfigError(
                "`multipart_threshold_mb` must be >= `multipart_chunk_mb`. Received: "
                f"{self.multipart_threshold_mb!r} < {self.multipart_chunk_mb!r}"
            )
        if self.max_unzip_ratio <= 1:
            raise ConfigError(f"`max_unzip_ratio` must be > 1. Received: {self.max_unzip_ratio!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AugmentConfig:
    """Paired image/mask augmentation (identical geometry for image and mask).

    Args:
        horizontal_flip: flip left-right with probability 0.5.
        vertical_flip: flip up-down with probability 0.5 (off: in ultrasound the
            transducer is at the top, so vertical flips make implausible images).
        rotation_deg: maximum absolute rotation, degrees.
        zoom: maximum relative zoom in or out (0.1 = 90%..110%).
        translate: maximum shift as a fraction of the side.
        brightness: maximum additive brightness change, on the [0, 1] scale.
        contrast: maximum relative contrast change (0.1 = 0.9..1.1).
        gamma: largest gamma change: each image becomes ``image ** g`` with ``log g`` drawn
            uniformly within ``±log(1 + gamma)`` (0.5: g in 0.67..1.5, about nnU-Net's range).
        noise: largest standard deviation of additive Gaussian noise, on the [0, 1] scale;
            each image draws its own within [0, noise].
        blur: largest Gaussian blur sigma, in pixels of the resized image; each image draws
            its own within [0, blur].
        The last three act on the image only (they are nnU-Net's intensity augmentations)
        and are off by default.
    """

    horizontal_flip: bool = True
    vertical_flip: bool = False
    rotation_deg: float = 10.0
    zoom: float = 0.1
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.0
    noise: float = 0.0
    blur: float = 0.0

    def __post_init__(self) -> None:
        limits = {"rotation_deg": 180.0, "zoom": 1.0, "translate": 0.5, "brightness": 1.0, "contrast": 1.0,
                  "gamma": 4.0, "noise": 1.0, "blur": 8.0}
        for name, high in limits.items():
            value = float(getattr(self, name))
            if not 0.0 <= value < high:
                raise ConfigError(f"augmentation `{name}` (flag --{name.replace('_', '-')}) must be within [0, {high:g}). "
                                  f"Received: {name}={value}")
            setattr(self, name, value)


#: The augmentation every run used before its ranges were saved in config.json.
AUGMENTATION_BEFORE_CONFIGURABLE: dict[str, Any] = {
    "horizontal_flip": True, "vertical_flip": False, "rotation_deg": 10.0, "zoom": 0.1, "translate": 0.05,
    "brightness": 0.1, "contrast": 0.1}


@dataclass
class LoaderConfig:
    """How a `tf.data.Dataset` is built from any of the three layouts.

    Args:
        image_size: (height, width) every image and mask is resized to.
        channels: 1 (grey) or 3 (grey replicated to RGB, or RGB kept).
        scale: ``"unit"`` gives float32 images in [0, 1]; ``"raw"`` in [0, 255]
            (for models that preprocess inside, such as the ResNet classifier).
        resize: ``"stretch"`` resizes to ``image_size``; ``"pad"`` keeps the aspect
            ratio and pads with zeros.
        batch_size: global batch size (divided across replicas by an InputContext).
        shuffle: shuffle (training); ``None`` means "shuffle the train split only".
        shuffle_buffer: size of the shuffle buffer.
        augment: apply ``augmentation`` (training); ``None`` means "train split only".
        cache: cache decoded, resized images in memory after the first epoch.
        deterministic: keep element order fixed under parallel decoding.
        drop_remainder: drop the last, smaller batch.
        seed: seed of shuffling and augmentation.
        lesion_only: segmentation only: keep the images whose mask marks a lesion (drops
            BUSI's normal images, whose masks are empty).
        autotune: tf.data's autotuning of parallel calls and prefetch buffers. Off by
            default: on a 2-core CPU, ending an autotuned iterator (Keras makes a new one
            every epoch) blocked for about 1.4 s in half the epochs, and the default U-Net
            trained at 66 to 74 images/s with it against 91 without (README, "tf.data
            autotuning"). Off, parallel calls use every core and the prefetch buffers still
            grow with demand.
    """

    image_size: tuple[int, int] = (256, 256)
    channels: int = 3
    scale: str = "unit"
    resize: str = "stretch"
    batch_size: int = 8
    shuffle: bool | None = None
    shuffle_buffer: int = 1024
    augment: bool | None = None
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    cache: bool = True
    deterministic: bool = False
    drop_remainder: bool = False
    seed: int = 1337
    lesion_only: bool = False
    autotune: bool = False

    def __post_init__(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ConfigError(
                "`image_size` must be (height, width), each >= 8. "
                f"Received: image_size={self.image_size}"
            )
        if self.channels not in (1, 3):
            raise ConfigError(f"`channels` must be 1 or 3. Received: channels={self.channels}")
        if self.scale not in ("unit", "raw"):
            raise ConfigError(f"`scale` must be 'unit' or 'raw'. Received: scale={self.scale!r}")
        if self.resize not in ("stretch", "pad"):
            raise ConfigError(
                f"`resize` must be 'stretch' or 'pad'. Received: resize={self.resize!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"`batch_size` must be >= 1. Received: batch_size={self.batch_size}")
        if isinstance(self.augmentation, dict):
            self.augmentation = AugmentConfig(**self.augmentation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


class _TrainingConfig:
    """What every trainer config shares: validation of the common fields, dict round trip."""

    #: Fields added after run folders were first written, with what a saved config without them meant.
    _SAVED_BEFORE: dict[str, Any] = {}

    def _check_common(self) -> None:
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[attr-defined]
        if isinstance(self.augmentation, dict):  # type: ignore[attr-defined]
            self.augmentation = AugmentConfig(**self.augmentation)  # type: ignore[attr-defined]
        if self.profile_batches is not None:  # type: ignore[attr-defined]
            self.profile_batches = tuple(int(b) for b in self.profile_batches)  # type: ignore[attr-defined]
            if len(self.profile_batches) != 2 or not 0 < self.profile_batches[0] <= self.profile_batches[1]:
                raise ConfigError(
                    "`profile_batches` must be START,STOP with 0 < START <= STOP. "
                    f"Received: profile_batches={self.profile_batches}"
                )
        if self.schedule not in ("cosine", "plateau", "constant"):  # type: ignore[attr-defined]
            raise ConfigError(f"`schedule` must be cosine, plateau or constant. Received: schedule={self.schedule!r}")
        if self.strategy not in ("default", "onedevice", "mirrored", "multiworker"):  # type: ignore[attr-defined]
            raise ConfigError("`strategy` must be default, onedevice, mirrored or multiworker. "
                              f"Received: strategy={self.strategy!r}")  # type: ignore[attr-defined]
        if self.precision not in PRECISIONS:  # type: ignore[attr-defined]
            raise ConfigError(f"`precision` must be one of {', '.join(PRECISIONS)}. Received: precision={self.precision!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)}")
        if not self.learning_rate > 0:  # type: ignore[attr-defined]
            raise ConfigError(f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate}")
        if not 0.0 <= self.ema < 1.0:  # type: ignore[attr-defined]
            raise ConfigError(f"`ema` must be 0 (off) or a momentum in (0, 1), e.g. 0.99. Received: ema={self.ema}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown {cls.__name__} field(s) {sorted(unknown)}. Known: {sorted(known)}")
        return cls(**{**cls._SAVED_BEFORE, **d})


@dataclass
class SegmenterConfig(_TrainingConfig):
    """`tf-bus train-segmenter`: model, loss, optimisation, data. Saved as RUN_DIR/config.json.

    Args:
        image_size: (height, width) the images are resized to; divisible by 2**depth.
        channels: 1 (grey: BUSI is grey) or 3.
        depth, base_filters, batch_norm, dropout, upsampling, padding: the U-Net
            (see ``tf_bus.models.unet.UNet``).
        attention_gates, transformer_blocks, transformer_heads: its attention options
            (Attention U-Net gates on the skips; transformer blocks at the bottleneck), off
            by default (README, "Attention").
        deep_supervision: auxiliary outputs on the decoder's levels 1..N, trained with
            their own losses (``tf_bus.models.unet.DeepSupervision``); 0: none. The saved
            models are plain U-Nets either way.
        loss: ``bce``, ``dice``, ``bce_dice``, ``focal_tversky`` or ``boundary_bce_dice``
            (``tf_bus.models.losses``).
        epochs: maximum epochs.
        batch_size: global batch size.
        learning_rate: peak learning rate (Adam).
        schedule: ``cosine`` (warm-up then cosine decay to 1% over ``epochs`` or over the
            time budget, whichever runs out first: ``BudgetedCosine``), ``plateau`` (halve
            on a validation-loss plateau) or ``constant``.
        warmup_epochs: linear warm-up epochs for ``cosine``.
        weight_decay: AdamW decoupled weight decay (0 for plain Adam).
        ema: above 0, the momentum of an exponential moving average of the weights
            (Polyak averaging, Keras' ``use_ema``), updated every step: validation, the
            checkpoints and the final model use the averaged weights (``EMAWeights``).
            0 disables.
        augment: paired augmentation of the training split.
        augmentation: its ranges (``AugmentConfig``: flips, rotation, zoom, shift,
            brightness, contrast; gamma, noise and blur, off by default).
        copy_paste: the probability that a training image receives another image's
            lesion (flipped, shifted, blended in; its mask joins the image's own), after the
            augmentation above (``tf_bus.training.segmentation.copy_paste``); 0 disables.
        lesion_only: train and validate on the images with a lesion only (BUSI's normal
            images, whose masks are empty, left out: the protocol of most published BUSI
            segmentation results). Evaluation still scores every image, normal ones apart.
            On by default since three pairs of real runs gained 0.04, 0.06 and 0.02 test
            Dice on lesion images with it (README, U-Net results); the model then marks
            some false area on most normal images. Configs saved before the field existed
            mean False.
        precision: ``float32``, ``mixed_bfloat16``, ``mixed_float16`` (with loss scaling),
            or ``auto``: bf16 on a GPU of compute capability 8.0 and up or a CPU with
            AVX512_BF16/AMX, float16 on a GPU of capability 7.x, else float32
            (``tf_bus.training.precision.auto_precision``).
        early_stopping_patience: epochs without a better validation Dice before stopping
            (0 disables).
        time_budget_minutes: stop after the epoch that crosses this wall time (0: none).
        threshold: probability threshold for the Dice/IoU metrics.
        seed: seeds weights, shuffling and augmentation.
        deterministic: the same seed, data and machine give bit-identical runs: tf.data
            keeps its element order under parallel decoding, TensorFlow runs its
            deterministic kernels (``tf.config.experimental.enable_op_determinism``, for
            the run's duration) and the learning rate follows the steps only, not the
            time budget's clock. Off by default: without it two runs with one seed differ
            (README, "Reproducible runs").
        profile_batches: (start, stop) batches traced by the TensorBoard profiler, or None.
        diagnostics: watch training with the Debugger rules (vanishing/exploding gradients,
            overfit, poor initialisation, stalled loss) and write RUN_DIR/diagnostics.*.
        strategy: ``default``, ``onedevice``, ``mirrored`` or ``multiworker`` (TF_CONFIG; see
            tf_bus.training.distribute); ``batch_size`` is the global batch over the replicas.
    """

    image_size: tuple[int, int] = (128, 128)
    channels: int = 1
    depth: int = 5  # three pairs of real runs (README, U-Net results) put depth 5 0.02 to 0.04 test Dice ahead of 4
    base_filters: int = 16
    batch_norm: bool = True
    dropout: float = 0.1
    upsampling: str = "transpose"
    padding: str = "same"
    attention_gates: bool = False
    transformer_blocks: int = 0
    transformer_heads: int = 4
    deep_supervision: int = 0
    loss: str = "bce_dice"
    # Batch 32 for 120 epochs at 4e-3 (the rate of batch 8 scaled by sqrt(4)): five-fold CV
    # Dice 0.744 against 0.738 for batch 8 / 60 epochs / 2e-3, in about the same wall time, at
    # 1.5x the images/s (README, U-Net results). Where the epochs do not fit in the time
    # budget (float32 on 2 cores), the budget-aware cosine (BudgetedCosine) anneals by its end.
    epochs: int = 120
    batch_size: int = 32
    learning_rate: float = 4e-3
    schedule: str = "cosine"
    warmup_epochs: int = 2
    weight_decay: float = 1e-4
    ema: float = 0.0
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    copy_paste: float = 0.0
    lesion_only: bool = True  # three pairs of real runs: +0.04, +0.06, +0.02 test Dice (README)
    precision: str = "auto"
    early_stopping_patience: int = 20
    time_budget_minutes: float = 38.0
    threshold: float = 0.5
    seed: int = 1337
    deterministic: bool = False
    profile_batches: tuple[int, int] | None = None
    diagnostics: bool = True
    strategy: str = "default"

    _SAVED_BEFORE = {"lesion_only": False, "augmentation": AUGMENTATION_BEFORE_CONFIGURABLE}

    def __post_init__(self) -> None:
        self._check_common()
        if self.loss not in SEGMENTATION_LOSSES:
            raise ConfigError(f"`loss` must be one of {', '.join(SEGMENTATION_LOSSES)}. Received: loss={self.loss!r}")
        check_unet_arguments(image_size=self.image_size, channels=self.channels, depth=self.depth,
                             base_filters=self.base_filters, upsampling=self.upsampling, padding=self.padding,
                             transformer_blocks=self.transformer_blocks, transformer_heads=self.transformer_heads)
        check_deep_supervision(self.deep_supervision, depth=self.depth, padding=self.padding)
        if not 0.0 <= self.copy_paste <= 1.0:
            raise ConfigError("`copy_paste` must be a probability in [0, 1] (0 disables). "
                              f"Received: copy_paste={self.copy_paste}")


#: What may pick the classifier's best checkpoint, and whether lower or higher is better.
CLASSIFIER_MONITORS: dict[str, str] = {"val_ce": "min", "val_f1": "max"}


#: The classifier's backbones: bottleneck blocks in each residual stage (conv2..conv5).
#: resnet50/101 are keras.applications' (ImageNet weights exist for them); resnet14/26 are
#: the same bottleneck ResNet (He et al. 2016) with fewer blocks, as in timm, for small data
#: and quick runs: a ResNet50 graph takes seconds to trace, a resnet14's under half that.
BACKBONE_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet14": (1, 1, 1, 1), "resnet26": (2, 2, 2, 2)}
BACKBONES: tuple[str, ...] = tuple(BACKBONE_BLOCKS)
#: The backbones that keras.applications ships ImageNet weights for.
IMAGENET_BACKBONES: tuple[str, ...] = ("resnet50", "resnet101")


def _check_imagenet(weights: str | None, backbones: tuple[str, ...]) -> None:
    """``weights=imagenet`` with a backbone that has none is a config error, before any data is read."""
    others = [b for b in backbones if b not in IMAGENET_BACKBONES]
    if weights == "imagenet" and others:
        raise ConfigError(f"`weights=imagenet` exists for {' and '.join(IMAGENET_BACKBONES)} only. Received: "
                          f"backbone(s) {', '.join(others)}; pass weights=None or a local weights file of that backbone")


#: The classifier's default augmentation: wider geometry than the segmenter's.
CLASSIFIER_AUGMENTATION = AugmentConfig(rotation_deg=15.0, zoom=0.2, translate=0.1)


@dataclass
class ClassifierConfig(_TrainingConfig):
    """`tf-bus train-classifier`: backbone, weights, fine-tuning, data. Saved as RUN_DIR/config.json.

    Args:
        backbone: one of ``BACKBONES``: ``resnet50`` (the default) or ``resnet101``
            (keras.applications), or the smaller ``resnet14`` / ``resnet26`` (same blocks,
            fewer of them; no ImageNet weights).
        weights: ``imagenet`` (resnet50/101), a path to a local backbone weights file, or
            None (from scratch).
        image_size: (height, width) of the input.
        channels: 1 (grey, replicated inside the model) or 3.
        dropout: dropout before the softmax.
        head_epochs: phase 1 with pre-trained weights: epochs training the head only.
        fine_tune_stages: phase 2 with pre-trained weights: top residual stages unfrozen
            (BatchNorm stays frozen). From scratch every stage trains.
        epochs: total epochs (both phases).
        batch_size: global batch size.
        learning_rate: learning rate of the head phase and of from-scratch training.
        fine_tune_learning_rate: learning rate of phase 2 with pre-trained weights.
        schedule, warmup_epochs, weight_decay, ema: as for the segmenter.
        label_smoothing: label smoothing of the cross-entropy.
        mask_loss_weight: above 0, multi-task training: a lesion head on the backbone's
            conv4/conv5 features learns the lesion mask (BCE + soft Dice, this weight) next
            to the class, so the from-scratch backbone learns where the lesion is. Needs
            masks: a `tf-bus prepare` output or the raw release. Only the classifier is
            saved, evaluated and exported. 0 disables.
        mixup: the Beta(alpha, alpha) parameter of mixup on the training batches (Zhang
            et al. 2018): each image is blended with another of its batch, and so are
            their one-hot labels and lesion masks. 0 disables.
        lesion_pooling: with the lesion head, the class head also pools the conv4 features
            under the predicted lesion and sees the lesion presence
            (``LesionAttentionPool``); the served classifier then runs the lesion head.
        bn_momentum: BatchNormalization momentum of a from-scratch backbone (0.99 in
            keras.applications lags on small data; see ``build_classifier``).
        balance: ``layout`` (use the offline-balanced train split of a prepared layout;
            class weights for a raw release), ``class_weights`` or ``sampling``
            (classes drawn equally).
        monitor: what picks ``best.keras`` and drives early stopping: ``val_ce`` (the
            validation cross-entropy of the class probabilities, no label smoothing, no
            lesion loss; lower is better) or ``val_f1`` (validation macro-F1). On 88
            validation images macro-F1 jumps by 0.05 from epoch to epoch; the
            cross-entropy, a proper scoring rule, moves smoothly.
        augment, augmentation, precision, early_stopping_patience, time_budget_minutes, seed,
        deterministic, profile_batches, diagnostics: as for the segmenter (early stopping on ``monitor``;
        the default patience equals the default epochs, so a default run trains to the end and
        keeps the best ``monitor`` epoch; the default augmentation is ``CLASSIFIER_AUGMENTATION``).
    """

    backbone: str = "resnet50"
    weights: str | None = None
    image_size: tuple[int, int] = (128, 128)
    channels: int = 1
    dropout: float = 0.3
    head_epochs: int = 3
    fine_tune_stages: int = 2
    # The defaults from `epochs` to `early_stopping_patience`: long and regularised training
    # (mixup, AdamW 0.05, wider geometric augmentation, no early stop), cross-validated
    # against the earlier defaults (README, "Classifier results": accuracy 0.733 vs 0.683).
    epochs: int = 60  # the time clock drives the cosine (BudgetedCosine) when fewer fit in the budget
    batch_size: int = 16
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: int = 1
    weight_decay: float = 0.05
    ema: float = 0.0
    label_smoothing: float = 0.1
    mask_loss_weight: float = 1.0
    lesion_pooling: bool = False
    mixup: float = 0.2
    bn_momentum: float = 0.9
    balance: str = "layout"
    augment: bool = True
    augmentation: AugmentConfig = field(default_factory=lambda: dataclasses.replace(CLASSIFIER_AUGMENTATION))
    precision: str = "auto"
    monitor: str = "val_ce"
    early_stopping_patience: int = 60
    time_budget_minutes: float = 43.0
    seed: int = 1337
    deterministic: bool = False
    profile_batches: tuple[int, int] | None = None
    diagnostics: bool = True
    strategy: str = "default"

    _SAVED_BEFORE = {"augmentation": AUGMENTATION_BEFORE_CONFIGURABLE}

    def __post_init__(self) -> None:
        self._check_common()
        if self.backbone not in BACKBONES:
            raise ConfigError(f"`backbone` must be one of {', '.join(BACKBONES)}. Received: backbone={self.backbone!r}")
        _check_imagenet(self.weights, (self.backbone,))
        if min(self.image_size) < 32:
            raise ConfigError(f"`image_size` must be at least 32x32 for a ResNet. Received: image_size={self.image_size}")
        if not 0 <= self.fine_tune_stages <= 5:
            raise ConfigError(f"`fine_tune_stages` must be within 0..5. Received: fine_tune_stages={self.fine_tune_stages}")
        if not 0.0 < self.bn_momentum < 1.0:
            raise ConfigError(f"`bn_momentum` must be within (0, 1). Received: bn_momentum={self.bn_momentum}")
        if not self.mask_loss_weight >= 0:
            raise ConfigError(f"`mask_loss_weight` must be >= 0. Received: mask_loss_weight={self.mask_loss_weight}")
        if not self.mixup >= 0:
            raise ConfigError(f"`mixup` must be >= 0 (0 disables). Received: mixup={self.mixup}")
        if self.monitor not in CLASSIFIER_MONITORS:
            raise ConfigError(f"`monitor` must be {' or '.join(CLASSIFIER_MONITORS)}. Received: monitor={self.monitor!r}")
        if self.lesion_pooling and self.mask_loss_weight <= 0:
            raise ConfigError("`lesion_pooling` needs the lesion head (`mask_loss_weight` > 0). "
                              "Received: lesion_pooling=True, mask_loss_weight=0")
        if self.balance not in ("layout", "class_weights", "sampling"):
            raise ConfigError(f"`balance` must be layout, class_weights or sampling. Received: balance={self.balance!r}")


TUNERS: tuple[str, ...] = ("random", "hyperband", "bayesian")


@dataclass
class TuneConfig:
    """`tf-bus tune`: the KerasTuner search over the classifier. Saved in TUNE_DIR.

    Every ``*_range`` is (low, high), sampled on a log scale for the learning rate and
    weight decay; a range with low == high (or a one-element choice) fixes that value.
    Fields of the classifier that are not searched come from ``base``.

    Args:
        base: the classifier config each trial starts from.
        tuner: ``random``, ``hyperband`` or ``bayesian``.
        max_trials: trials to run (random, bayesian). Hyperband runs as many as its
            brackets need for ``epochs_range[1]`` epochs and ``hyperband_factor``.
        executions_per_trial: fits per trial (their objective is averaged).
        hyperband_factor: Hyperband's reduction factor.
        learning_rate_range, weight_decay_range, dropout_range: continuous ranges.
        batch_sizes: the batch sizes to choose from.
        fine_tune_stages_range: residual stages unfrozen (pre-trained weights only).
        backbones: the backbones to choose from (any of ``BACKBONES``).
        epochs_range: the epochs budget per trial (step ``epochs_step``); Hyperband's
            ``max_epochs`` is its upper end.
    """

    base: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(time_budget_minutes=0))
    tuner: str = "random"
    max_trials: int = 10
    executions_per_trial: int = 1
    hyperband_factor: int = 3
    learning_rate_range: tuple[float, float] = (1e-5, 1e-1)
    weight_decay_range: tuple[float, float] = (1e-6, 1e-1)
    dropout_range: tuple[float, float] = (0.0, 0.6)
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    fine_tune_stages_range: tuple[int, int] = (1, 4)
    backbones: tuple[str, ...] = ("resnet50", "resnet101")
    epochs_range: tuple[int, int] = (5, 30)
    epochs_step: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.base, dict):
            self.base = ClassifierConfig.from_dict(self.base)
        if self.tuner not in TUNERS:
            raise ConfigError(f"`tuner` must be one of {', '.join(TUNERS)}. Received: tuner={self.tuner!r}")
        for name in ("max_trials", "executions_per_trial", "epochs_step"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1. Received: {name}={getattr(self, name)}")
        if self.hyperband_factor < 2:
            raise ConfigError(f"`hyperband_factor` must be >= 2. Received: hyperband_factor={self.hyperband_factor}")
        for name, lo_ok in (("learning_rate_range", 0.0), ("weight_decay_range", 0.0)):
            lo, hi = getattr(self, name)
            if not lo_ok < lo <= hi:
                raise ConfigError(f"`{name}` must be LOW,HIGH with 0 < LOW <= HIGH (log scale). Received: {name}={(lo, hi)}")
        lo, hi = self.dropout_range
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"`dropout_range` must be LOW,HIGH within [0, 1). Received: dropout_range={(lo, hi)}")
        lo, hi = self.fine_tune_stages_range
        if not 0 <= lo <= hi <= 5:
            raise ConfigError(f"`fine_tune_stages_range` must be LOW,HIGH within 0..5. Received: {(lo, hi)}")
        lo, hi = self.epochs_range
        if not 1 <= lo <= hi:
            raise ConfigError(f"`epochs_range` must be LOW,HIGH with 1 <= LOW <= HIGH. Received: epochs_range={(lo, hi)}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"`batch_sizes` must be positive whole numbers. Received: batch_sizes={self.batch_sizes}")
        bad = set(self.backbones) - set(BACKBONES)
        if not self.backbones or bad:
            raise ConfigError(f"`backbones` must be one or more of {', '.join(BACKBONES)}. "
                              f"Received: backbones={self.backbones}")
        _check_imagenet(self.base.weights, tuple(self.backbones))
        for name in ("learning_rate_range", "weight_decay_range", "dropout_range", "fine_tune_stages_range",
                     "epochs_range", "batch_sizes", "backbones"):
            setattr(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"Unknown TuneConfig field(s) {sorted(unknown)}. Known: {sorted(known)}")
        return cls(**d)
