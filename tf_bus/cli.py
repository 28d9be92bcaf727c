"""The `tf-bus` command: a thin argparse layer over the library, one subcommand per stage.

Errors that a user can fix (bad data, bad flags, existing outputs) are printed as one
message with the fix, exit status 2, and no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from tf_bus.config import BACKBONES, PRECISIONS, SEGMENTATION_LOSSES, AugmentConfig, ConfigError

PRECISION_HELP = ("compute precision. auto: mixed_bfloat16 on a GPU of compute capability 8.0+ (A100, H100, RTX 30xx) "
                  "or a CPU with native bf16 (AVX512_BF16/AMX); mixed_float16, with loss scaling, on a GPU of capability "
                  "7.x (V100, T4); float32 otherwise (default: auto)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.15,0.15, got {text!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions train,validation,test, got {text!r}")
    return parts  # type: ignore[return-value]


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write a small synthetic BUSI-like release",
                       description="Write synthetic BUSI-like cases in the release layout "
                                   "(OUT/Dataset_BUSI_with_GT/<class>/...), for tests and the demo.")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--n", type=_positive_int, default=60, help="number of cases, at least 9 (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from tf_bus.data.synthetic import make_synthetic

    root = make_synthetic(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.n} synthetic cases to {root}")
    return 0


def _add_read_flags(p) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out cases with bad files and list them, instead of stopping at the first report")
    p.add_argument("--near-threshold", type=float, default=None,
                   help="near-duplicate test: minimum correlation of 32x32 grey thumbnails (default: 0.90)")
    p.add_argument("--detail-threshold", type=float, default=None,
                   help="near-duplicate test: minimum correlation of high-passed thumbnails (default: 0.45)")
    p.add_argument("--workers", type=_positive_int, default=4, help="threads reading images (default: 4)")


def _prepare_config(args):
    from tf_bus.config import BalanceConfig, DuplicateConfig, PrepareConfig, SplitConfig

    dup = DuplicateConfig()
    if args.near_threshold is not None:
        dup.near_threshold = args.near_threshold
    if args.detail_threshold is not None:
        dup.detail_threshold = args.detail_threshold
    DuplicateConfig(**dup.__dict__)  # validate
    fr = getattr(args, "split", None) or (0.70, 0.15, 0.15)
    return PrepareConfig(
        split=SplitConfig(*fr, seed=getattr(args, "seed", 1337)),
        duplicates=dup,
        balance=BalanceConfig(method=getattr(args, "balance", "augment")),
        skip_bad=args.skip_bad,
        workers=args.workers,
    )


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="validate a release and report duplicate groups",
                       description="Read every image and mask of a BUSI release, report bad files "
                                   "and duplicate groups (exact and near), write nothing under RAW_DIR.")
    p.add_argument("raw_dir", metavar="RAW_DIR", help="Dataset_BUSI_with_GT (or its parent)")
    p.add_argument("--json", metavar="FILE", help="also write the report (problems, duplicate groups) to FILE")
    _add_read_flags(p)
    p.set_defaults(func=_cmd_check)


def _cmd_check(args) -> int:
    from tf_bus.data.busi import read_release
    from tf_bus.data.split import find_duplicates
    from tf_bus.io import write_json_atomic

    cfg = _prepare_config(args)
    read = read_release(args.raw_dir, skip_bad=args.skip_bad, thumb_size=cfg.duplicates.thumb_size, workers=args.workers)
    dups = find_duplicates(read.infos, cfg.duplicates)
    d = dups.to_dict()
    print(f"{len(read.infos)} cases read from {read.root}; {len(read.problems)} problem(s)")
    for pr in read.problems:
        print(f"  skipped: {pr}")
    print(f"{len(d['groups'])} duplicate groups holding {d['num_cases_in_duplicate_groups']} cases; "
          f"{len(d['exact_duplicates'])} exact; {len(d['cross_class_groups'])} filed under two classes:")
    for g in d["cross_class_groups"]:
        print("  cross-class: " + ", ".join(g))
    if args.json:
        write_json_atomic(args.json, {"problems": [p.to_dict() for p in read.problems], **d})
        print(f"report -> {args.json}")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="split a release without leakage and write both layouts",
                       description="Read RAW_DIR, group duplicates, split train/validation/test by group "
                                   "(class-stratified), and write OUT_DIR/classification, "
                                   "OUT_DIR/segmentation, splits.json, duplicates.json, manifest.json. "
                                   "Written to a temporary folder and renamed at the end.")
    _add_prepare_args(p)
    p.set_defaults(func=_cmd_prepare)


def _add_prepare_config_flags(p) -> None:
    """The flags that make a PrepareConfig (prepare, stage prepare, stage all)."""
    p.add_argument("--split", type=_fractions, default=None, metavar="TR,VA,TE",
                   help="split fractions train,validation,test (default: 0.7,0.15,0.15)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the split (default: 1337)")
    p.add_argument("--balance", choices=("augment", "none"), default="augment",
                   help="augment: add augmented copies of minority classes to classification/train only; "
                        "none: leave it (use class weights or balanced sampling) (default: augment)")
    _add_read_flags(p)


def _add_prepare_args(p) -> None:
    p.add_argument("raw_dir", metavar="RAW_DIR", help="Dataset_BUSI_with_GT (or its parent); never modified")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--splits", metavar="SPLITS_JSON", help="reuse this splits.json instead of making a split")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR once the new one is complete; its splits.json is reused")
    p.add_argument("--resplit", action="store_true", help="with --overwrite: make a new split instead of reusing")
    _add_prepare_config_flags(p)


def _cmd_prepare(args) -> int:
    from tf_bus.data.layouts import prepare

    report = prepare(args.raw_dir, args.out_dir, _prepare_config(args), overwrite=args.overwrite,
                     splits_file=args.splits, resplit=args.resplit)
    print(json.dumps({k: v for k, v in report.to_dict().items() if k != "cross_class_groups"}, indent=2))
    if report.cross_class_groups:
        print(f"note: {len(report.cross_class_groups)} duplicate group(s) are filed under two classes "
              "(see duplicates.json, cross_class_groups); each stays within one split.")
    return 0


def _add_s3_connection_flags(p) -> None:
    """Where the S3 store is; credentials come only from boto3's chain, never from flags."""
    p.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="S3-compatible endpoint (MinIO, Ceph, Swift s3api), e.g. http://localhost:9000 "
                        "(default: AWS_ENDPOINT_URL, else AWS S3). Credentials come from the environment "
                        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), ~/.aws or an instance role, never from flags")
    p.add_argument("--aws-profile", default=None, metavar="NAME",
                   help="named profile of ~/.aws/config (default: AWS_PROFILE, else default)")
    p.add_argument("--region", default=None, help="region (default: the profile's, AWS_REGION, else us-east-1)")
    p.add_argument("--retries", type=_positive_int, default=5, metavar="N",
                   help="attempts per request, retried with exponential backoff by botocore (default: 5)")


def _add_s3_data_flags(p) -> None:
    """For commands whose --data may be an s3:// publish."""
    _add_s3_connection_flags(p)
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where s3:// data is staged (default: TF_BUS_CACHE/s3, else ~/.cache/tf-bus/s3)")


def _stage_config(args):
    from tf_bus.config import StageConfig

    kw = dict(endpoint_url=args.endpoint_url, profile=args.aws_profile, region=args.region, max_attempts=args.retries)
    for flag, field_name in (("concurrency", "max_concurrency"), ("chunk_mb", "multipart_chunk_mb"),
                             ("threshold_mb", "multipart_threshold_mb"), ("max_unzip_mb", "max_unzip_mb"),
                             ("cache_dir", "cache_dir"), ("checksum_algorithm", "checksum_algorithm")):
        if getattr(args, flag, None) is not None:
            kw[field_name] = getattr(args, flag)
    return StageConfig(**kw)


def _add_stage(sub) -> None:
    from tf_bus.config import CHECKSUM_ALGORITHMS, StageConfig

    d = StageConfig()
    p = sub.add_parser("stage", help="S3 staging with boto3: upload, fetch, prepare, publish (or all five steps)",
                       description="The data steps through S3 (AWS, MinIO, Ceph, Swift s3api): 1 upload the raw "
                                   "release, 2 fetch + verify + unzip it, 3-4 prepare (structure + leak-free split), "
                                   "5 publish both layouts with a manifest.json written last. Every step is "
                                   "idempotent: run it again to skip what is done and finish what was interrupted.")
    steps = p.add_subparsers(dest="step", metavar="STEP", required=True)

    def common(q, transfers: bool = True) -> None:
        _add_s3_connection_flags(q)
        if transfers:
            q.add_argument("--concurrency", type=_positive_int, default=d.max_concurrency,
                           help=f"parallel files and multipart parts (default: {d.max_concurrency})")
            q.add_argument("--chunk-mb", type=_positive_int, default=d.multipart_chunk_mb,
                           help=f"multipart part size in MiB, at least 5 (default: {d.multipart_chunk_mb})")
            q.add_argument("--threshold-mb", type=_positive_int, default=d.multipart_threshold_mb,
                           help=f"files this large or larger go up in parts (default: {d.multipart_threshold_mb})")
            q.add_argument("--checksum-algorithm", choices=CHECKSUM_ALGORITHMS, default=None,
                           help="also send S3's additional checksum (x-amz-checksum-*) with every upload and validate "
                                "it on downloads, where the store supports it (default: none; Content-MD5 and ETags "
                                "are always checked)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    q = steps.add_parser("upload", help="1: upload the raw release zip (or zip a folder on the fly)",
                         description="Upload RAW_ZIP_OR_DIR to S3_URL (a prefix ending with / gets the zip's name; "
                                     "a folder is zipped reproducibly, so a re-run recognises the same content). "
                                     "Skipped if the same bytes are there; an interrupted multipart upload resumes.")
    q.add_argument("src", metavar="RAW_ZIP_OR_DIR", help="the BUSI zip, or Dataset_BUSI_with_GT (or its parent)")
    q.add_argument("dest", metavar="S3_URL", help="s3://BUCKET/PREFIX/raw/ (or a full key)")
    common(q)
    q.set_defaults(func=_cmd_stage)

    q = steps.add_parser("fetch", help="2: download, verify (MD5/ETag) and safely unzip the raw release",
                         description="Download the zip at S3_URL (or the one zip under a prefix) into LOCAL_DIR, "
                                     "verify its checksum, and unzip it into LOCAL_DIR/<zip name>/, refusing absolute "
                                     "paths, '..' members, links and zip bombs. Prints the release root.")
    q.add_argument("src", metavar="S3_URL", help="s3://BUCKET/PREFIX/raw/ or s3://BUCKET/PREFIX/raw/NAME.zip")
    q.add_argument("dest", metavar="LOCAL_DIR", help="where the zip and the unzipped release go")
    q.add_argument("--max-unzip-mb", type=_positive_int, default=d.max_unzip_mb,
                   help=f"refuse archives that unpack to more than this (default: {d.max_unzip_mb})")
    common(q)
    q.set_defaults(func=_cmd_stage)

    q = steps.add_parser("prepare", help="3-4: structure the folders and split (the foundation's prepare)",
                         description="Exactly `tf-bus prepare` on a fetched release: group duplicates, split "
                                     "train/validation/test by group, write both layouts.")
    _add_prepare_args(q)
    q.set_defaults(func=_cmd_prepare)

    q = steps.add_parser("publish", help="5: upload both layouts + split; manifest.json last",
                         description="Upload a `tf-bus prepare` output to S3_URL in parallel, skipping files already "
                                     "there with the same content, verify every object, then write S3_URL/manifest.json "
                                     "(each file's key, size, MD5). Readers (training on s3://) trust only a manifest.")
    q.add_argument("src", metavar="LOCAL_OUT", help="a `tf-bus prepare` output folder")
    q.add_argument("dest", metavar="S3_URL", help="s3://BUCKET/PREFIX/ready/")
    common(q)
    q.set_defaults(func=_cmd_stage)

    q = steps.add_parser("all", help="the five steps in order: upload, fetch, prepare, publish",
                         description="upload RAW to S3_BASE/raw/, fetch it into WORK/raw, prepare WORK/prepared, "
                                     "publish to S3_BASE/ready/. Run it again to finish an interrupted run; what is "
                                     "done is skipped.")
    q.add_argument("src", metavar="RAW_ZIP_OR_DIR", help="the BUSI zip, or Dataset_BUSI_with_GT (or its parent)")
    q.add_argument("dest", metavar="S3_BASE", help="s3://BUCKET/PREFIX/ (raw/ and ready/ go under it)")
    q.add_argument("--work", required=True, metavar="WORK_DIR", help="local folder for the fetched and prepared data")
    q.add_argument("--max-unzip-mb", type=_positive_int, default=d.max_unzip_mb,
                   help=f"refuse archives that unpack to more than this (default: {d.max_unzip_mb})")
    _add_prepare_config_flags(q)
    common(q)
    q.set_defaults(func=_cmd_stage)


def _cmd_stage(args) -> int:
    from tf_bus import staging

    config = _stage_config(args)
    if args.step == "upload":
        reports = [staging.upload(args.src, args.dest, config, quiet=args.quiet)]
    elif args.step == "fetch":
        reports = [staging.fetch(args.src, args.dest, config, quiet=args.quiet)]
    elif args.step == "publish":
        reports = [staging.publish(args.src, args.dest, config, quiet=args.quiet)]
    else:
        reports = staging.stage_all(args.src, args.dest, args.work, config, _prepare_config(args), quiet=args.quiet,
                                    log=lambda m: print(m, file=sys.stderr))
    out = [r.to_dict() for r in reports]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    return 0


def _add_eda(sub) -> None:
    p = sub.add_parser("eda", help="class counts, image sizes, lesion areas (JSON + PNG)",
                       description="Write eda.json and PNG charts for a `tf-bus prepare` output or a raw release.")
    p.add_argument("data", metavar="DIR", help="a prepare output folder or a raw release")
    p.add_argument("--out", metavar="OUT", help="where to write (default: DIR/eda for a prepare output, ./eda for a release)")
    p.set_defaults(func=_cmd_eda)


def _cmd_eda(args) -> int:
    from tf_bus.data.eda import eda

    out = args.out
    if out is None:
        out = os.path.join(args.data, "eda") if os.path.isdir(os.path.join(args.data, "classification")) else "eda"
    stats = eda(args.data, out)
    print(json.dumps({k: stats[k] for k in ("class_counts_before_balancing", "class_counts_after_balancing")}, indent=2))
    print(f"eda.json, class_counts.png, image_sizes.png, lesion_area.png -> {out}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the pipeline on synthetic data or a real release",
                       description="Run the pipeline: synthetic data (or DATA), prepare, EDA, a batch from each loader, "
                                   "brief training of both models, export, and tf-bus serve queried over REST and gRPC.")
    p.add_argument("data", metavar="DATA", nargs="?", help="a Dataset_BUSI_with_GT folder (default: synthetic data)")
    p.add_argument("--out", default="demo_output", help="output folder, replaced on each run (default: demo_output)")
    p.add_argument("--n", type=_positive_int, default=60, help="synthetic cases when no DATA is given (default: 60)")
    p.add_argument("--no-train", action="store_true",
                   help="stop after the data stage (no training, export or serving)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from tf_bus.demo import run_demo

    run_demo(args.data, args.out, n_synthetic=args.n, train=not args.no_train)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or H,W like 128 or 128,160, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"expected SIZE or H,W with each >= 8, got {text!r}")
    return parts[0], parts[1]


def _batches(text: str) -> tuple[int, int]:
    try:
        a, b = (int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,STOP like 10,15, got {text!r}") from None
    return a, b


def _add_training_flags(p, d, monitored: str) -> None:
    """The flags every trainer shares; defaults come from its config ``d``."""
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"global batch size (default: {d.batch_size})")
    p.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default=d.schedule,
                   help="cosine: warm-up then cosine decay to 1%% over --epochs or --time-budget, whichever runs out first; "
                        f"plateau: halve on a val-loss plateau; constant (default: {d.schedule})")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help=f"warm-up epochs for cosine (default: {d.warmup_epochs})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"AdamW weight decay, 0 for Adam (default: {d.weight_decay})")
    p.add_argument("--ema", type=float, default=d.ema, metavar="MOMENTUM",
                   help="keep an exponential moving average of the weights with this momentum (e.g. 0.99), updated "
                        "every step; validation, best.keras and last.keras then use the averaged weights; 0 is off "
                        f"(default: {d.ema:g})")
    p.add_argument("--no-augment", action="store_true", help="turn off the augmentation of the training split")
    a = d.augmentation
    p.add_argument("--rotation-deg", type=float, default=a.rotation_deg, metavar="DEG",
                   help=f"augmentation: largest rotation either way, degrees (default: {a.rotation_deg:g})")
    p.add_argument("--zoom", type=float, default=a.zoom,
                   help=f"augmentation: largest zoom in or out, as a fraction (0.2: 80%%..120%%) (default: {a.zoom:g})")
    p.add_argument("--translate", type=float, default=a.translate,
                   help=f"augmentation: largest shift, as a fraction of the side (default: {a.translate:g})")
    p.add_argument("--brightness", type=float, default=a.brightness,
                   help=f"augmentation: largest brightness change, on the [0, 1] pixel scale (default: {a.brightness:g})")
    p.add_argument("--contrast", type=float, default=a.contrast,
                   help=f"augmentation: largest relative contrast change (0.25: 75%%..125%%) (default: {a.contrast:g})")
    p.add_argument("--gamma", type=float, default=a.gamma,
                   help="augmentation: largest gamma change, image**g with g within 1/(1+GAMMA)..1+GAMMA "
                        f"(0.5: 0.67..1.5, nnU-Net's range); 0 is off (default: {a.gamma:g})")
    p.add_argument("--noise", type=float, default=a.noise,
                   help="augmentation: largest standard deviation of Gaussian noise on the [0, 1] pixel scale, "
                        f"each image drawing its own from 0 up; 0 is off (default: {a.noise:g})")
    p.add_argument("--blur", type=float, default=a.blur, metavar="SIGMA",
                   help="augmentation: largest Gaussian blur sigma in pixels of the resized image, each image "
                        f"drawing its own from 0 up; 0 is off (default: {a.blur:g})")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help=PRECISION_HELP)
    p.add_argument("--patience", type=int, default=d.early_stopping_patience,
                   help=f"early stopping: epochs without a better {monitored}, 0 disables (default: {d.early_stopping_patience})")
    p.add_argument("--time-budget", type=float, default=d.time_budget_minutes, metavar="MINUTES",
                   help="stop after the epoch that crosses this wall time; the cosine schedule anneals by then; 0 for none "
                        f"(default: {d.time_budget_minutes:g})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of weights, shuffling, augmentation (default: {d.seed})")
    p.add_argument("--deterministic", action="store_true",
                   help="bit-identical runs for the same seed, data and machine: tf.data keeps its order and TensorFlow "
                        "runs deterministic kernels (enable_op_determinism); the learning rate then follows the steps "
                        "only, not the --time-budget clock. No slower on our 2-core CPU (README, \"Reproducible runs\") "
                        "(default: off)")
    p.add_argument("--profile-batches", type=_batches, default=None, metavar="START,STOP",
                   help="write a TensorBoard profiler trace of these training batches (default: none)")
    p.add_argument("--strategy", choices=("default", "onedevice", "mirrored", "multiworker"), default=d.strategy,
                   help="tf.distribute strategy: default; onedevice (first GPU, else CPU); mirrored (every GPU, or "
                        "every logical CPU); multiworker (MultiWorkerMirroredStrategy over the processes in TF_CONFIG, "
                        "the same command on every host; worker 0 writes RUN_DIR, the others RUN_DIR/workers/). "
                        "--batch-size is the global batch, split evenly over the replicas; the "
                        "learning rate belongs to the global batch (if you grow the global batch with the replicas, "
                        "scale the learning rate by the same factor) (default: default)")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="turn off the training diagnostics (vanishing/exploding gradients, overfit, poor "
                        "initialisation, stalled loss; report in RUN_DIR/diagnostics.md)")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="K-fold cross-validation instead of one run (K >= 2): the split's duplicate groups are dealt "
                        "into K class-stratified folds; RUN_DIR/fold_<k>/ trains on the other folds (less a "
                        "validation share) and is scored on fold k as the evaluate command does (with --tta); "
                        "RUN_DIR/cross_validation.json pools every case's scores. Needs a raw release or a "
                        "`tf-bus prepare` output as --data; K runs take K times as long (default: 0, one run)")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="train K runs on the same split, seeds --seed, --seed+1, ... (RUN_DIR/member_<k>/), served "
                        "and evaluated as one model averaging their outputs (RUN_DIR itself goes to export, predict "
                        "--run and the evaluate commands); the segmenter's threshold is then chosen for the average "
                        "on the validation split. K runs take K times as long (--time-budget is each member's); on "
                        "BUSI 4 U-Nets scored +0.019 Dice over one (README, \"A seed ensemble\") (default: 1, one run)")
    p.add_argument("--fold-validation", type=float, default=0.10, metavar="FRACTION",
                   help="with --folds: each fold's validation share of all cases (0.10 with 5 folds leaves 70%% for "
                        "training, as the default split does) (default: 0.1)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in RUN_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar (one line per epoch)")


def _training_kwargs(args) -> dict:
    """Config fields set by ``_add_training_flags``."""
    return dict(batch_size=args.batch_size, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
                weight_decay=args.weight_decay, ema=args.ema, augment=not args.no_augment,
                augmentation=AugmentConfig(rotation_deg=args.rotation_deg, zoom=args.zoom, translate=args.translate,
                                           brightness=args.brightness, contrast=args.contrast,
                                           gamma=args.gamma, noise=args.noise, blur=args.blur),
                precision=args.precision,
                early_stopping_patience=args.patience, time_budget_minutes=args.time_budget, seed=args.seed,
                deterministic=args.deterministic, profile_batches=args.profile_batches,
                diagnostics=not args.no_diagnostics, strategy=args.strategy)


def _train_or_cross_validate(kind: str, train, args, config) -> int:
    """One run of ``train`` into --out, with --ensemble K seeds of it, or with --folds a
    cross-validation; prints the summary."""
    verbose = 2 if args.quiet else 1
    if args.ensemble != 1:
        if args.ensemble < 2:
            raise ConfigError(f"--ensemble must be at least 1 (1: one run). Received: {args.ensemble}")
        if args.folds:
            raise ConfigError("--ensemble trains K seeds on one split and --folds K splits; pass one of them (a "
                              "--folds K folder is already served as its folds averaged)")
        if config.strategy == "multiworker":
            raise ConfigError("--ensemble trains its members one after another in this process; it does not "
                              "combine with --strategy multiworker")
        from tf_bus.training.ensemble import train_ensemble

        summary = train_ensemble(kind, args.data, args.out, config, members=args.ensemble, splits_file=args.splits,
                                 overwrite=args.overwrite, verbose=verbose)
        print(json.dumps({k: summary[k] for k in ("members", "validation")}, indent=2))
        print(f"the members averaged: export, predict --run and evaluate {args.out}")
        return 0
    if not args.folds:
        summary = train(args.data, args.out, config, splits_file=args.splits, overwrite=args.overwrite, verbose=verbose)
        print(json.dumps(summary, indent=2))
        return 0
    from tf_bus.training.cross_validation import cross_validate

    if config.strategy == "multiworker":
        raise ConfigError("--folds runs the folds one after another in this process; it does not combine with "
                          "--strategy multiworker (cross-validate on one host, or train the folds' splits.json "
                          "files as separate multi-worker runs)")
    summary = cross_validate(kind, args.data, args.out, config, folds=args.folds, validation=args.fold_validation,
                             splits_file=args.splits, overwrite=args.overwrite, verbose=verbose)
    print(json.dumps({k: summary[k] for k in ("pooled", "fold_mean", "fold_std", "folds")}, indent=2))
    print(f"per-case scores of every fold -> {Path(args.out) / 'cross_validation.json'}")
    return 0


def _add_train_segmenter(sub) -> None:
    from tf_bus.config import SegmenterConfig

    d = SegmenterConfig()
    p = sub.add_parser("train-segmenter", help="train the U-Net lesion segmenter",
                       description="Train a from-scratch U-Net on DIR and write RUN_DIR (config.json, best.keras, "
                                   "last.keras, history.csv/json, logs/ for TensorBoard). Starting again with the "
                                   "same --out after a kill resumes from the last finished epoch.")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a `tf-bus prepare` output, its segmentation/ layout, a raw Dataset_BUSI_with_GT, or the "
                        "s3:// prefix of a `tf-bus stage publish` (staged to a local cache first)")
    _add_s3_data_flags(p)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (resumed if unfinished)")
    p.add_argument("--splits", metavar="SPLITS_JSON", help="with a raw release: the split to use (default: computed as prepare does)")
    p.add_argument("--image-size", type=_size, default=d.image_size, metavar="H,W",
                   help=f"input size, divisible by 2**depth (default: {d.image_size[0]},{d.image_size[1]})")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help=f"input channels (default: {d.channels})")
    p.add_argument("--depth", type=_positive_int, default=d.depth, help=f"U-Net levels (default: {d.depth})")
    p.add_argument("--base-filters", type=_positive_int, default=d.base_filters,
                   help=f"filters of the first level, doubled per level (default: {d.base_filters})")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout in the deepest blocks (default: {d.dropout})")
    p.add_argument("--upsampling", choices=("transpose", "resize"), default=d.upsampling,
                   help=f"transposed conv or bilinear resize + conv (default: {d.upsampling})")
    p.add_argument("--padding", choices=("same", "valid"), default=d.padding,
                   help=f"same: output at input size; valid: the paper's unpadded U-Net (default: {d.padding})")
    p.add_argument("--attention-gates", action=argparse.BooleanOptionalAction, default=d.attention_gates,
                   help="pass each skip through an additive attention gate (Attention U-Net, Oktay et al. 2018) "
                        f"before the decoder concatenates it (default: {'on' if d.attention_gates else 'off'})")
    p.add_argument("--transformer-blocks", type=int, default=d.transformer_blocks,
                   help="transformer blocks (self-attention over every position, then an MLP) after the "
                        f"bottleneck's convolutions, as in TransUNet; 0: none (default: {d.transformer_blocks})")
    p.add_argument("--transformer-heads", type=int, default=d.transformer_heads,
                   help="attention heads of those blocks; must divide base_filters * 2**depth "
                        f"(default: {d.transformer_heads})")
    p.add_argument("--deep-supervision", type=int, default=d.deep_supervision, metavar="N",
                   help="deep supervision: auxiliary outputs on the decoder's levels 1..N (1/2 .. 1/2**N of the "
                        "image size), each trained against the mask pooled to its size with a loss weight halved "
                        "per level, as in nnU-Net; the saved model is a plain U-Net. 0: off; N < depth "
                        f"(default: {d.deep_supervision})")
    p.add_argument("--loss", choices=SEGMENTATION_LOSSES, default=d.loss,
                   help="training loss: bce; dice (soft Dice); bce_dice (their sum); focal_tversky; boundary_bce_dice "
                        "(bce_dice whose BCE weighs the pixels within 2 px of the true outline 5 times) "
                        f"(default: {d.loss})")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"maximum epochs (default: {d.epochs})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help=f"peak learning rate (default: {d.learning_rate})")
    p.add_argument("--threshold", type=float, default=d.threshold, help=f"threshold of the Dice/IoU metrics (default: {d.threshold})")
    p.add_argument("--copy-paste", type=float, default=d.copy_paste, metavar="P",
                   help="copy-paste augmentation (Ghiasi et al. 2021): with probability P a training image receives "
                        "the lesion of another image of its batch, flipped and shifted at random and blended in, and "
                        f"its mask gains the pasted one; 0: off (default: {d.copy_paste:g})")
    p.add_argument("--lesion-only", action=argparse.BooleanOptionalAction, default=d.lesion_only,
                   help="train and validate on the images with a lesion only, leaving out the normal images (empty "
                        "masks), as most published BUSI segmentation results do; evaluate-segmenter still scores "
                        "every image, normal ones apart. --no-lesion-only trains on every image, which teaches the "
                        "model to leave normal images empty but makes it miss more lesions "
                        f"(default: {'on' if d.lesion_only else 'off'})")
    _add_training_flags(p, d, "validation Dice")
    p.set_defaults(func=_cmd_train_segmenter)


def _cmd_train_segmenter(args) -> int:
    from tf_bus.config import SegmenterConfig
    from tf_bus.training.segmentation import train_segmenter

    config = SegmenterConfig(
        image_size=args.image_size, channels=args.channels, depth=args.depth, base_filters=args.base_filters,
        dropout=args.dropout, upsampling=args.upsampling, padding=args.padding, attention_gates=args.attention_gates,
        transformer_blocks=args.transformer_blocks, transformer_heads=args.transformer_heads,
        deep_supervision=args.deep_supervision, loss=args.loss,
        epochs=args.epochs, learning_rate=args.learning_rate, threshold=args.threshold, lesion_only=args.lesion_only,
        copy_paste=args.copy_paste,
        **_training_kwargs(args),
    )
    return _train_or_cross_validate("segmenter", train_segmenter, args, config)


def _add_evaluate_segmenter(sub) -> None:
    p = sub.add_parser("evaluate-segmenter", help="per-image TPR/FPR/Jaccard/Dice/HD95 of a trained U-Net",
                       description="Evaluate RUN_DIR's best model on a split: per-image and aggregate metrics "
                                   "(lesion and normal images apart) to RUN_DIR/eval_SPLIT/metrics.json and an "
                                   "overlay grid to overlays.png.")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a train-segmenter run folder; a --folds K folder: its folds averaged, as `tf-bus "
                        "export` serves them, on data other than what it cross-validated; or an --ensemble K "
                        "folder: its members averaged")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="prepare output, segmentation layout, raw release, or an s3:// publish")
    _add_s3_data_flags(p)
    p.add_argument("--split", choices=("train", "validation", "test"), default="test", help="split to evaluate (default: test)")
    p.add_argument("--splits", metavar="SPLITS_JSON", help="with a raw release: the split file to use")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average with the left-right flip")
    p.add_argument("--threshold", type=float, default=None,
                   help="probability threshold (default: RUN_DIR/threshold.json if present, else the run's; "
                        "a --folds K folder: the median of its folds')")
    p.add_argument("--postprocess", choices=("none", "largest"), default=None,
                   help="none: the thresholded mask; largest: keep its largest connected component, holes filled "
                        "(default: the choice in RUN_DIR/threshold.json if present, else none; a --folds K "
                        "folder: largest if most of its folds chose it)")
    p.add_argument("--choose-threshold", action="store_true",
                   help="first pick the threshold, and the --postprocess unless given, with the best mean lesion "
                        "Dice on the validation split (saved to RUN_DIR/threshold.json, which later evaluations "
                        "and export reuse)")
    p.set_defaults(func=_cmd_evaluate_segmenter)


def _cmd_evaluate_segmenter(args) -> int:
    from tf_bus.evaluation import evaluate_segmenter

    res = evaluate_segmenter(args.run_dir, args.data, args.split, tta=args.tta, threshold=args.threshold,
                             postprocess=args.postprocess, choose_on_validation=args.choose_threshold, splits_file=args.splits)
    agg = res["aggregate"]
    print(json.dumps({"settings": res["settings"], "aggregate": agg}, indent=2))
    print(f"per-image metrics and overlays -> {os.path.join(args.run_dir, 'eval_' + args.split)}")
    return 0


def _add_classifier_flags(p, d) -> None:
    """Data and model flags that train-classifier and tune share."""
    p.add_argument("--data", required=True, metavar="DIR",
                   help="a `tf-bus prepare` output, its classification/ layout, a raw Dataset_BUSI_with_GT, or the "
                        "s3:// prefix of a `tf-bus stage publish` (staged to a local cache first)")
    _add_s3_data_flags(p)
    p.add_argument("--splits", metavar="SPLITS_JSON", help="with a raw release: the split to use")
    p.add_argument("--weights", default="none", metavar="imagenet|none|PATH",
                   help="backbone weights: imagenet (downloaded by Keras), none (from scratch), or a local "
                        "include_top=False weights file (default: none)")
    p.add_argument("--image-size", type=_size, default=d.image_size, metavar="H,W",
                   help=f"input size, at least 32 (default: {d.image_size[0]},{d.image_size[1]})")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels,
                   help=f"input channels; grey is replicated inside the model (default: {d.channels})")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"label smoothing (default: {d.label_smoothing})")
    p.add_argument("--mixup", type=float, default=d.mixup, metavar="ALPHA",
                   help="mixup on the training batches: each image is blended with another of its batch by a "
                        "Beta(ALPHA, ALPHA) weight, and so are their labels and lesion masks; 0 disables "
                        f"(default: {d.mixup:g})")
    p.add_argument("--mask-loss-weight", type=float, default=d.mask_loss_weight, metavar="W",
                   help="multi-task training: above 0, a lesion head on the backbone learns the lesion masks (BCE + "
                        "Dice, weight W) next to the class; needs a `tf-bus prepare` output or the raw release; only "
                        f"the classifier is saved and exported; 0 disables (default: {d.mask_loss_weight:g})")
    p.add_argument("--lesion-pooling", action=argparse.BooleanOptionalAction, default=d.lesion_pooling,
                   help="with the lesion head: the class head also pools the conv4 features under the predicted "
                        "lesion and sees the lesion presence; the served classifier then runs the lesion head "
                        f"(default: {'on' if d.lesion_pooling else 'off'})")
    p.add_argument("--bn-momentum", type=float, default=d.bn_momentum,
                   help="BatchNorm momentum of a from-scratch backbone; keras.applications' 0.99 lags on a few dozen "
                        f"steps an epoch (default: {d.bn_momentum:g})")
    p.add_argument("--balance", choices=("layout", "class_weights", "sampling"), default=d.balance,
                   help="layout: the offline-balanced train split of a prepared layout (class weights for a raw "
                        "release); class_weights; sampling: classes drawn equally (default: layout)")


def _add_train_classifier(sub) -> None:
    from tf_bus.config import ClassifierConfig

    d = ClassifierConfig()
    p = sub.add_parser("train-classifier", help="fine-tune (or train from scratch) the ResNet classifier",
                       description="Train a ResNet (50 by default) benign/malignant/normal classifier on DIR and write RUN_DIR "
                                   "(config.json, best.keras on validation macro-F1, last.keras, history, logs/). "
                                   "With pre-trained weights: head first (backbone frozen), then the top stages. "
                                   "Starting again with the same --out after a kill resumes.")
    _add_classifier_flags(p, d)
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (resumed if unfinished)")
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone,
                   help=f"backbone: resnet50 or resnet101 (keras.applications; ImageNet weights exist), or resnet14 / "
                        f"resnet26, the same bottleneck ResNet with 1 or 2 blocks a stage (measured at 128 px: 2.6-3.1x "
                        f"and 1.7x ResNet50's training images/s; from scratch or a local weights file). Without "
                        f"ImageNet weights resnet14 scores at least level with ResNet50 in under half its time: five-fold CVs on "
                        f"BUSI, accuracy 0.716-0.760 against ResNet50's 0.714-0.741 (default: {d.backbone})")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"dropout before the softmax (default: {d.dropout})")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs,
                   help=f"with pre-trained weights: epochs of head-only training (default: {d.head_epochs})")
    p.add_argument("--fine-tune-stages", type=int, default=d.fine_tune_stages,
                   help=f"with pre-trained weights: top residual stages unfrozen after the head phase, 0-5 (default: {d.fine_tune_stages})")
    p.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"total epochs, both phases (default: {d.epochs})")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help=f"learning rate of the head phase and of from-scratch training (default: {d.learning_rate})")
    p.add_argument("--fine-tune-learning-rate", type=float, default=d.fine_tune_learning_rate,
                   help=f"learning rate after unfreezing (default: {d.fine_tune_learning_rate})")
    p.add_argument("--monitor", choices=("val_ce", "val_f1"), default=d.monitor,
                   help="what picks best.keras and drives early stopping: val_ce, the validation cross-entropy of "
                        "the class probabilities (lower is better; smooth), or val_f1, validation macro-F1 (jumps by "
                        f"0.05 an epoch on 88 images) (default: {d.monitor})")
    _add_training_flags(p, d, "--monitor value")
    p.set_defaults(func=_cmd_train_classifier)


def _cmd_train_classifier(args) -> int:
    from tf_bus.config import ClassifierConfig
    from tf_bus.training.classification import train_classifier

    config = ClassifierConfig(
        backbone=args.backbone, weights=None if args.weights.lower() == "none" else args.weights,
        image_size=args.image_size, channels=args.channels, dropout=args.dropout, head_epochs=args.head_epochs,
        fine_tune_stages=args.fine_tune_stages, epochs=args.epochs, learning_rate=args.learning_rate,
        fine_tune_learning_rate=args.fine_tune_learning_rate, label_smoothing=args.label_smoothing,
        mask_loss_weight=args.mask_loss_weight, lesion_pooling=args.lesion_pooling, mixup=args.mixup,
        bn_momentum=args.bn_momentum, balance=args.balance, monitor=args.monitor, **_training_kwargs(args),
    )
    return _train_or_cross_validate("classifier", train_classifier, args, config)


def _add_evaluate_classifier(sub) -> None:
    p = sub.add_parser("evaluate-classifier", help="accuracy, precision/recall/F1, AUC, confusion matrix",
                       description="Evaluate RUN_DIR's classifier (best.keras, or --checkpoint last) on a split (original images only): "
                                   "metrics.json, confusion_matrix.png and roc.png in RUN_DIR/eval_SPLIT.")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a train-classifier run folder; a --folds K folder: its folds averaged, as `tf-bus "
                        "export` serves them, on data other than what it cross-validated; or an --ensemble K "
                        "folder: its members averaged")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="prepare output, classification layout, raw release, or an s3:// publish")
    _add_s3_data_flags(p)
    p.add_argument("--split", choices=("train", "validation", "test"), default="test", help="split to evaluate (default: test)")
    p.add_argument("--splits", metavar="SPLITS_JSON", help="with a raw release: the split file to use")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image's probabilities with its mirror image's")
    p.add_argument("--checkpoint", choices=("best", "last"), default="best",
                   help="best: best.keras (the run's best --monitor epoch); last: last.keras, the weights when "
                        "training ended (default: best)")
    p.set_defaults(func=_cmd_evaluate_classifier)


def _cmd_evaluate_classifier(args) -> int:
    from tf_bus.evaluation import evaluate_classifier

    res = evaluate_classifier(args.run_dir, args.data, args.split, splits_file=args.splits, tta=args.tta,
                              checkpoint=args.checkpoint)
    print(json.dumps({k: v for k, v in res.items() if k != "per_image"}, indent=2))
    print(f"metrics.json, confusion_matrix.png, roc.png -> {os.path.join(args.run_dir, 'eval_' + args.split)}")
    return 0


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="paired comparison of two evaluations, with bootstrap intervals",
                       description="Compare two evaluations case by case: two cross-validations (--folds) or two "
                                   "evaluations of one split (evaluate-segmenter/-classifier). Cases are paired by "
                                   "name; a paired bootstrap over the cases gives the 95%% interval of each "
                                   "difference B - A (an interval that holds 0: the data cannot tell them apart). "
                                   "Segmenters: Dice, Jaccard, TPR, FPR, precision of the lesion images, failures, "
                                   "normals predicted empty. Classifiers: accuracy, macro-F1, per-class F1, "
                                   "McNemar's exact test.")
    for name in ("a", "b"):
        p.add_argument(name, metavar=name.upper(),
                       help=f"result {name.upper()}: a cross-validation folder, an evaluated run folder "
                            "(its eval_SPLIT/metrics.json), or either JSON file")
    p.add_argument("--split", choices=("train", "validation", "test"), default="test",
                   help="for run folders: which evaluation to read, eval_SPLIT/metrics.json (default: test)")
    p.add_argument("--resamples", type=int, default=10000,
                   help="bootstrap resamples of the cases; at least 100 (default: 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default: 0)")
    p.add_argument("--out", metavar="JSON", help="also write the whole comparison to this JSON file")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw a PNG: per-image Dice of A against B (segmenters) or per-class F1 (classifiers)")
    p.add_argument("--labels", default="A,B", metavar="A,B",
                   help="names of the two results on the plot, comma-separated (default: A,B)")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from tf_bus.comparison import compare, plot_comparison, summary_lines, to_json
    from tf_bus.data.busi import TfBusError
    from tf_bus.io import write_json_atomic

    labels = tuple(args.labels.split(","))
    if len(labels) != 2 or not all(labels):
        raise TfBusError(f"--labels takes two names separated by a comma, e.g. plain,gated. Received: {args.labels!r}")
    result = compare(args.a, args.b, split=args.split, resamples=args.resamples, seed=args.seed)
    print("\n".join(summary_lines(result)))
    if args.out:
        write_json_atomic(args.out, to_json(result))
        print(f"comparison -> {args.out}")
    if args.plot:
        plot_comparison(result, args.plot, labels)
        print(f"plot -> {args.plot}")
    return 0


def _add_fuse(sub) -> None:
    p = sub.add_parser("fuse", help="lesion-aware classification: stack the U-Net's mask descriptors on the ResNet",
                       description="Stack a U-Net cross-validation and a ResNet cross-validation run on the same "
                                   "data with the same folds (train-segmenter/train-classifier --folds K): every "
                                   "case's held-out U-Net mask is described (shape, orientation, margin, echo, "
                                   "posterior features, confidence; tf_bus.descriptors) and gradient-boosted trees "
                                   "combine the descriptors with the held-out ResNet probabilities. The trees are "
                                   "scored fold by fold (fitted on the other folds), then fitted on every case. "
                                   "Writes DIR/descriptors.csv, cross_validation.json (the classifier CV's schema: "
                                   "`tf-bus compare CLF_CV DIR` works), fusion_model.json and PNGs.")
    p.add_argument("segmenter_cv", metavar="SEG_CV", help="the --out folder of `tf-bus train-segmenter --folds K`")
    p.add_argument("classifier_cv", metavar="CLF_CV", help="the --out folder of `tf-bus train-classifier --folds K`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--presence-cv", metavar="PRES_CV",
                   help="the --out folder of a second `tf-bus train-segmenter --no-lesion-only --folds K` on the "
                        "same data: that U-Net, trained on every image, learns to leave normal images empty, and "
                        "its confidence that an image holds a lesion (max/top probability, marked share, area) "
                        "joins the features (default: none)")
    p.add_argument("--data", metavar="DIR",
                   help="the release the cross-validations were trained on, if it has moved since (default: the "
                        "path SEG_CV recorded)")
    p.add_argument("--trees", type=_positive_int, default=200, help="boosting stages (default: 200)")
    p.add_argument("--depth", type=_positive_int, default=2, help="depth of each tree (default: 2)")
    p.add_argument("--learning-rate", type=float, default=0.05, help="shrinkage of each tree (default: 0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trees and of the bootstrap (default: 0)")
    p.add_argument("--resamples", type=int, default=10000,
                   help="bootstrap resamples of the paired comparison with the ResNet (default: 10000)")
    p.set_defaults(func=_cmd_fuse)


def _cmd_fuse(args) -> int:
    from tf_bus.fusion import fuse, summary_lines

    result = fuse(args.segmenter_cv, args.classifier_cv, args.out, presence_cv=args.presence_cv, data=args.data,
                  trees=args.trees, depth=args.depth, learning_rate=args.learning_rate, seed=args.seed,
                  resamples=args.resamples)
    print("\n".join(summary_lines(result)))
    print(f"fusion -> {Path(args.out).expanduser().resolve()}")
    return 0


def _add_fuse_predict(sub) -> None:
    p = sub.add_parser("fuse-predict", help="classify image files with a `tf-bus fuse` result",
                       description="Classify image files with the folds of a `tf-bus fuse` result: for each fold, "
                                   "that fold's U-Net mask is described and its ResNet's probabilities taken, the "
                                   "fusion trees (fusion_model.json) give fused probabilities, and the folds' "
                                   "fused probabilities are averaged. Prints one JSON line per image.")
    p.add_argument("fused_dir", metavar="FUSED_DIR", help="the --out folder of `tf-bus fuse`")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG/JPEG/BMP files, or folders of them (not recursing; files named like BUSI masks, "
                        "<name>_mask.png, are left out of a folder)")
    p.add_argument("--folds", action="store_true",
                   help="also print each fold's ResNet probabilities, descriptors, presence descriptors (with a "
                        "presence U-Net) and fused probabilities")
    p.set_defaults(func=_cmd_fuse_predict)


def _cmd_fuse_predict(args) -> int:
    from tf_bus.data.busi import image_files
    from tf_bus.fusion import predict_fused

    for row in predict_fused(args.fused_dir, image_files(args.images)):
        if not args.folds:
            row.pop("folds")
        print(json.dumps(row))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a trained run as a SavedModel for TensorFlow Serving",
                       description="Export RUN_DIR's best model (segmenter or classifier) to "
                                   "MODELS/NAME/VERSION/, the layout tensorflow_model_server watches, with the "
                                   "signatures serving_default (encoded image bytes in) and predict_tensor (float "
                                   "images in). RUN_DIR may also be a --folds K cross-validation folder: its K fold "
                                   "models averaged (as nnU-Net predicts), at the median of the folds' thresholds; an "
                                   "--ensemble K folder: its K seeds averaged, at the threshold chosen for them on "
                                   "validation; or a "
                                   "`tf-bus fuse` result: one SavedModel with every "
                                   "fold's U-Net and ResNet, the lesion descriptors and the trees (serving_default "
                                   "only). Written to a temporary folder and renamed; versions are never overwritten.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train-segmenter or train-classifier run folder, a --folds K "
                                                      "or --ensemble K folder (its models averaged), or a tf-bus "
                                                      "fuse --out folder")
    p.add_argument("--model-base-path", required=True, metavar="MODELS",
                   help="the folder of models (TF Serving's --model_base_path is MODELS/NAME)")
    p.add_argument("--name", required=True, help="model name: letters, digits, '_', '-', '.'")
    p.add_argument("--version", type=_positive_int, default=None,
                   help="version number (default: one more than the highest existing)")
    p.add_argument("--threshold", type=float, default=None,
                   help="segmenter: mask threshold baked into the signature (default: RUN_DIR/threshold.json, "
                        "else the run's; for a --folds K folder, the median of its folds')")
    p.add_argument("--postprocess", choices=("none", "largest"), default=None,
                   help="segmenter: mask post-processing baked into the signature; largest keeps the largest "
                        "component, holes filled (default: RUN_DIR/threshold.json's choice, else none; for a --folds K "
                        "folder, largest if most folds chose it)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from tf_bus.export import export_run

    info = export_run(args.run_dir, args.model_base_path, args.name, args.version, threshold=args.threshold,
                      postprocess=args.postprocess)
    print(json.dumps(info, indent=2))
    return 0


def _flag_bool(text: str) -> bool:
    """A boolean flag's value as tensorflow_model_server reads it (true/false, 1/0)."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; give true or false")
    return value


def _add_serve(sub) -> None:
    from tf_bus.serving.server import ServerOptions

    d = ServerOptions()
    p = sub.add_parser("serve", help="serve SavedModels over TF Serving's REST and gRPC APIs",
                       description="A model server speaking TensorFlow Serving's REST (/v1/models/...) and gRPC "
                                   "(PredictionService, ModelService) APIs, for machines without "
                                   "tensorflow_model_server. Flags, config files and model folders are TF Serving's. "
                                   "Stops gracefully on SIGTERM/SIGINT.")
    p.add_argument("--port", type=int, default=d.port, help=f"gRPC port, 0 for any free one (default: {d.port})")
    p.add_argument("--rest_api_port", type=int, default=d.rest_api_port,
                   help=f"REST port; 0 turns REST off, as in TF Serving (default: {d.rest_api_port})")
    p.add_argument("--host", default=d.rest_api_host, help=f"address to bind both servers to (default: {d.rest_api_host})")
    p.add_argument("--model_config_file", help="a ModelServerConfig text proto (models, version policies, labels)")
    p.add_argument("--model_name", help="with --model_base_path: the one model's name (default: default)")
    p.add_argument("--model_base_path", help="the one model's folder of numbered versions")
    p.add_argument("--enable_batching", type=_flag_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="batch concurrent Predict requests server-side (--enable_batching or =true/false, as in "
                        "TF Serving)")
    p.add_argument("--batching_parameters_file", help="a BatchingParameters text proto (max_batch_size, "
                                                      "batch_timeout_micros, num_batch_threads, max_enqueued_batches)")
    p.add_argument("--monitoring_config_file", help="a MonitoringConfig text proto; prometheus_config enables metrics "
                                                    "at its path on the REST port")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=d.file_system_poll_wait_seconds,
                   help="how often to look for new or removed versions; 0 loads once (default: 1)")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float,
                   default=d.model_config_file_poll_wait_seconds,
                   help="how often to re-read --model_config_file and apply it when it changed (models added, "
                        "removed, new policies and labels, as HandleReloadConfigRequest); 0 reads it once "
                        "(default: 0)")
    p.add_argument("--allow_version_labels_for_unavailable_models", type=_flag_bool, nargs="?", const=True,
                   default=False, metavar="BOOL",
                   help="let a new version_label name a version that is not loaded yet; without it, as in TF "
                        "Serving, labels in the startup config are refused, since nothing is loaded then")
    p.add_argument("--force_allow_any_version_labels_for_unavailable_models", type=_flag_bool, nargs="?",
                   const=True, default=False, metavar="BOOL",
                   help="let any label, also one moved to another version, name a version not loaded yet")
    p.add_argument("--enable_model_warmup", type=_flag_bool, nargs="?", const=True, default=d.enable_model_warmup,
                   metavar="BOOL", help="replay each version's assets.extra/tf_serving_warmup_requests (tf-bus export "
                                        "writes one) before it serves, so the first request is not slow "
                                        "(default: true)")
    p.add_argument("--num_request_iterations_for_warmup", type=int, default=d.num_request_iterations_for_warmup,
                   help=f"times each warmup request is replayed (default: {d.num_request_iterations_for_warmup})")
    p.add_argument("--max_num_load_retries", type=int, default=d.max_num_load_retries,
                   help="times a version that failed to load is tried again before it is left failed (END, with "
                        f"its error, until it leaves the disk and comes back) (default: {d.max_num_load_retries})")
    p.add_argument("--load_retry_interval_micros", type=int, default=d.load_retry_interval_micros,
                   help="microseconds between those tries (default: 60000000, one minute)")
    p.add_argument("--rest_api_max_body_bytes", type=int, default=d.rest_api_max_body_bytes,
                   help="larger REST bodies are refused with HTTP 413 (default: 64 MiB)")
    p.add_argument("--grpc_max_message_bytes", type=int, default=d.grpc_max_message_bytes,
                   help="gRPC maximum send/receive message size (default: 64 MiB)")
    p.add_argument("--grpc_max_threads", type=int, default=d.grpc_max_threads,
                   help=f"threads serving gRPC calls (default: {d.grpc_max_threads})")
    p.add_argument("--grpc_socket_path", default=None,
                   help="also serve gRPC on this UNIX socket (clients: unix:PATH), e.g. for a sidecar")
    p.add_argument("--ready_file", help="write 'GRPC_PORT REST_PORT' here once serving (for scripts and tests)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    import logging

    from tf_bus.serving.server import ServerOptions, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    opts = ServerOptions(
        port=args.port, rest_api_port=args.rest_api_port, rest_api_host=args.host, grpc_host=args.host,
        model_config_file=args.model_config_file, model_name=args.model_name, model_base_path=args.model_base_path,
        enable_batching=args.enable_batching, batching_parameters_file=args.batching_parameters_file,
        monitoring_config_file=args.monitoring_config_file,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
        model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
        enable_model_warmup=args.enable_model_warmup,
        num_request_iterations_for_warmup=args.num_request_iterations_for_warmup,
        max_num_load_retries=args.max_num_load_retries, load_retry_interval_micros=args.load_retry_interval_micros,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        force_allow_any_version_labels_for_unavailable_models=args.force_allow_any_version_labels_for_unavailable_models,
        rest_api_max_body_bytes=args.rest_api_max_body_bytes, grpc_max_message_bytes=args.grpc_max_message_bytes,
        grpc_max_threads=args.grpc_max_threads, grpc_socket_path=args.grpc_socket_path,
    )
    try:
        return run(opts, ready_file=args.ready_file)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from None


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="query a served model with image files (REST or gRPC)",
                       description="Send IMAGE files (or folders of them) to a tf-bus model served by TF Serving or "
                                   "`tf-bus serve`, --batch-size images a request, and print one JSON line per "
                                   "image: class probabilities (classifier) or the lesion area (segmenter, whose "
                                   "mask and overlay PNGs go to --out).")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG/JPEG/BMP files, or folders of them (not recursing; files named like BUSI masks, "
                        "<name>_mask.png, are left out of a folder)")
    p.add_argument("--batch-size", type=_positive_int, default=16,
                   help="images per request; each request's lines are printed as it is answered (default: 16)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="the server (default: localhost:8500 for grpc, localhost:8501 for rest)")
    p.add_argument("--protocol", choices=("grpc", "rest"), default="grpc", help="API to use (default: grpc)")
    p.add_argument("--model", default=None, help="the model name on the server (or --run)")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="no server: run a train-segmenter or train-classifier RUN_DIR's best model (a --folds K "
                        "or --ensemble K folder: its models averaged) in this process, "
                        "through the signature `tf-bus export` would serve (its threshold and post-processing), "
                        "and print the same lines (instead of --model)")
    p.add_argument("--version", type=_positive_int, default=None, help="a model version (default: the latest)")
    p.add_argument("--label", default=None, help="a version label such as stable (instead of --version)")
    p.add_argument("--out", default=None, metavar="DIR", help="segmenter: where to write <image>_mask.png and "
                                                               "<image>_overlay.png (default: ./predictions)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default: 60)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> int:
    from tf_bus.data.busi import TfBusError, image_files
    from tf_bus.serving.client import ServingClientError, predict_images

    if (args.model is None) == (args.run is None):
        raise TfBusError("pass one of --model NAME (a served model) or --run RUN_DIR (a run, in this process).")
    if args.run is not None and (args.version is not None or args.label is not None):
        raise TfBusError("--version and --label pick a served model's version; leave them out with --run.")
    files = image_files(args.images)
    server = args.server or ("localhost:8500" if args.protocol == "grpc" else "localhost:8501")
    if args.run is not None:
        from tf_bus.export import local_predictor

        _, local = local_predictor(args.run)
    for start in range(0, len(files), args.batch_size):
        batch = files[start:start + args.batch_size]
        images = []
        for f in batch:
            try:
                images.append(f.read_bytes())
            except OSError as e:
                raise TfBusError(f"{f}: cannot read it ({e.strerror})") from None
        if args.run is not None:
            out = _predict_locally(local, batch, images)
        else:
            try:
                out = predict_images(images, args.model, server=server, protocol=args.protocol,
                                     version=args.version, label=args.label, timeout=args.timeout)
            except ServingClientError as e:
                raise TfBusError(f"{server} ({args.protocol}) answered {e.status}: {e.message}") from None
            except ValueError as e:
                raise TfBusError(str(e)) from None
        _print_predictions(batch, images, out, Path(args.out or "predictions"))
    return 0


def _predict_locally(local, files: list[Path], images: list[bytes]) -> dict:
    """``local(images)``; a file that is no image is named, as a server would refuse it."""
    import tensorflow as tf

    from tf_bus.data.busi import TfBusError
    from tf_bus.data.pipeline import decode_image

    try:
        return local(images)
    except tf.errors.OpError:
        for f, raw in zip(files, images):
            try:
                decode_image(tf.constant(raw), 1)
            except tf.errors.OpError:
                raise TfBusError(f"{f}: cannot be read as an image; pass PNG, JPEG or BMP files.") from None
        raise


def _print_predictions(files: list[Path], images: list[bytes], out: dict, out_dir: Path) -> None:
    """One JSON line per image of one answered request: the classes, or the lesion area
    with the mask and overlay PNGs written to ``out_dir``."""
    if "probabilities" in out:
        from tf_bus.config import CLASS_NAMES

        for f, probs, name in zip(files, out["probabilities"], out["class_names"]):
            print(json.dumps({"image": str(f), "class": name.decode() if isinstance(name, bytes) else str(name),
                              "probabilities": {c: round(float(p), 6) for c, p in zip(CLASS_NAMES, probs)}}),
                  flush=True)
        return
    from tf_bus.serving.overlay import write_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    for f, raw, png, area in zip(files, images, out["mask_png_bytes"], out["lesion_area_fraction"]):
        mask_path, overlay_path = write_overlay(raw, png, out_dir, f.stem)
        print(json.dumps({"image": str(f), "lesion_area_fraction": round(float(area), 6), "mask": str(mask_path),
                          "overlay": str(overlay_path)}), flush=True)


def _add_explain(sub) -> None:
    from tf_bus.config import CLASS_NAMES

    p = sub.add_parser("explain", help="Grad-CAM heatmaps: where a trained classifier looks",
                       description="Grad-CAM of RUN_DIR's classifier (best.keras) on IMAGE files (or folders): for each "
                                   "image, <stem>_gradcam.png (the map over the image) and <stem>_heatmap.png (the map "
                                   "alone, 0..255) in --out, and one JSON line: the predicted class and probabilities, "
                                   "the class explained, the map's peak (row, column in image pixels) and, where a BUSI "
                                   "mask <stem>_mask.png lies beside the image, whether the peak falls in the lesion "
                                   "and the lesion's share of the image; a summary of those goes to stderr. "
                                   "The map has the backbone's stride 32 (4x4 cells at 128 px), resized smoothly.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train-classifier run folder (a fold of a CV: CV_DIR/fold_K)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="PNG/JPEG/BMP files, or folders of them (not recursing; BUSI mask files are left out)")
    p.add_argument("--out", default="explanations", metavar="DIR",
                   help="where the PNGs go (default: ./explanations)")
    p.add_argument("--target", default="predicted", choices=("predicted", *CLASS_NAMES),
                   help="the class whose evidence is mapped: each image's predicted class, or one class for every "
                        "image (default: predicted)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images a forward pass (default: 16)")
    p.set_defaults(func=_cmd_explain)


def _cmd_explain(args) -> int:
    from tf_bus.explain import explain_images

    records = explain_images(args.run_dir, args.images, args.out, target=args.target, batch_size=args.batch_size)
    for r in records:
        print(json.dumps(r), flush=True)
    scored = [r for r in records if r["peak_in_lesion"] is not None]
    if scored:
        hits, chance = sum(r["peak_in_lesion"] for r in scored), sum(r["lesion_area_fraction"] for r in scored)
        distance = statistics.median(r["peak_distance_to_lesion"] for r in scored)
        print(f"pointing game: the peak falls in the lesion in {hits} of {len(scored)} images with a lesion mask "
              f"(a point drawn at random: {chance:.1f} expected); median distance from the lesion {distance:.1f} px",
              file=sys.stderr)
    return 0


def _pair(kind):
    def parse(text: str):
        try:
            parts = [kind(p) for p in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH (or one value), got {text!r}") from None
        if len(parts) == 1:
            parts *= 2
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected LOW,HIGH (or one value), got {text!r}")
        return tuple(parts)
    return parse


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers like 8,16,32, got {text!r}") from None


def _add_tune(sub) -> None:
    from tf_bus.config import TUNERS, ClassifierConfig, TuneConfig

    t, d = TuneConfig(), ClassifierConfig()
    p = sub.add_parser("tune", help="KerasTuner search over the classifier's hyperparameters",
                       description="Search the classifier's hyperparameters with KerasTuner and write TUNE_DIR: "
                                   "trials.json (every trial's status, score, epochs), best_hyperparameters.json "
                                   "(values, score, full config), classifier/ (KerasTuner's project) and logs/ "
                                   "(TensorBoard, one folder per trial). The same command again resumes an "
                                   "interrupted search. Distributed: start one chief and N workers with the same "
                                   "command and KERASTUNER_ORACLE_IP, KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID "
                                   "(chief, tuner0, tuner1, ...) set; TUNE_DIR must be shared.")
    _add_classifier_flags(p, d)
    p.add_argument("--out", required=True, metavar="TUNE_DIR", help="search folder (resumed if it holds the same search)")
    p.add_argument("--tuner", choices=TUNERS, default=t.tuner,
                   help=f"random search, Hyperband (early-stops weak trials) or Bayesian optimisation (default: {t.tuner})")
    p.add_argument("--max-trials", type=_positive_int, default=t.max_trials,
                   help=f"trials to run (random, bayesian; Hyperband's brackets set its own count) (default: {t.max_trials})")
    p.add_argument("--executions-per-trial", type=_positive_int, default=t.executions_per_trial,
                   help=f"fits per trial, their scores averaged (default: {t.executions_per_trial})")
    p.add_argument("--hyperband-factor", type=int, default=t.hyperband_factor,
                   help=f"Hyperband's reduction factor (default: {t.hyperband_factor})")
    p.add_argument("--learning-rate-range", type=_pair(float), default=t.learning_rate_range, metavar="LOW,HIGH",
                   help="learning rate, log scale (default: 1e-5,1e-1)")
    p.add_argument("--weight-decay-range", type=_pair(float), default=t.weight_decay_range, metavar="LOW,HIGH",
                   help="AdamW weight decay, log scale (default: 1e-6,1e-1)")
    p.add_argument("--dropout-range", type=_pair(float), default=t.dropout_range, metavar="LOW,HIGH",
                   help="dropout before the softmax (default: 0,0.6)")
    p.add_argument("--batch-sizes", type=_int_list, default=t.batch_sizes, metavar="B,B,...",
                   help="batch sizes to choose from (default: 8,16,32)")
    p.add_argument("--fine-tune-stages-range", type=_pair(int), default=t.fine_tune_stages_range, metavar="LOW,HIGH",
                   help="with pre-trained --weights: residual stages unfrozen (default: 1,4)")
    p.add_argument("--backbones", type=lambda s: tuple(s.split(",")), default=t.backbones, metavar="NAME[,NAME]",
                   help=f"backbones to choose from, any of {','.join(BACKBONES)} (default: {','.join(t.backbones)})")
    p.add_argument("--epochs-range", type=_pair(int), default=t.epochs_range, metavar="LOW,HIGH",
                   help="epochs per trial; Hyperband's max_epochs is HIGH (default: 5,30)")
    p.add_argument("--epochs-step", type=_positive_int, default=t.epochs_step, help=f"step of the epochs range (default: {t.epochs_step})")
    p.add_argument("--schedule", choices=("cosine", "plateau", "constant"), default=d.schedule,
                   help=f"learning-rate schedule of every trial (default: {d.schedule})")
    p.add_argument("--no-augment", action="store_true", help="turn off the augmentation of the training split")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision, help=PRECISION_HELP)
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the tuner and of every trial (default: {d.seed})")
    p.add_argument("--strategy", choices=("default", "onedevice", "mirrored", "multiworker"), default=d.strategy,
                   help="tf.distribute strategy of every trial (KerasTuner's distribution_strategy): default; "
                        "onedevice; mirrored (every GPU, or every logical CPU); multiworker (each trial trains "
                        "across the processes in TF_CONFIG: the same command on every host, whose identical seeded "
                        "tuners run the same trials in step; worker 0 writes TUNE_DIR, the others "
                        "TUNE_DIR/workers/; not combined with KERASTUNER_* distributed tuning). Each batch size in "
                        "--batch-sizes is the global batch and must divide over the replicas (default: default)")
    p.add_argument("--deterministic", action="store_true",
                   help="every trial (and --retrain) as train-classifier --deterministic: a fixed tf.data order and "
                        "TensorFlow's deterministic kernels, so the same search with the same --seed scores its trials "
                        "alike (default: off)")
    p.add_argument("--retrain", metavar="RUN_DIR",
                   help="after the search, train the best configuration into RUN_DIR (as train-classifier does)")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs,
                   help="with pre-trained weights: epochs of head-only training in the --retrain run (trials "
                        f"fine-tune from their first epoch) (default: {d.head_epochs})")
    p.add_argument("--overwrite", action="store_true", help="start the search afresh instead of resuming it")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of progress bars")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from tf_bus.config import ClassifierConfig, TuneConfig
    from tf_bus.training.tuning import tune_classifier

    base = ClassifierConfig(
        weights=None if args.weights.lower() == "none" else args.weights, image_size=args.image_size,
        channels=args.channels, label_smoothing=args.label_smoothing, mask_loss_weight=args.mask_loss_weight,
        lesion_pooling=args.lesion_pooling, mixup=args.mixup, bn_momentum=args.bn_momentum, balance=args.balance,
        schedule=args.schedule,
        augment=not args.no_augment, precision=args.precision, seed=args.seed, time_budget_minutes=0,
        early_stopping_patience=0, strategy=args.strategy, head_epochs=args.head_epochs,
        deterministic=args.deterministic,
    )
    tune = TuneConfig(
        base=base, tuner=args.tuner, max_trials=args.max_trials, executions_per_trial=args.executions_per_trial,
        hyperband_factor=args.hyperband_factor, learning_rate_range=args.learning_rate_range,
        weight_decay_range=args.weight_decay_range, dropout_range=args.dropout_range, batch_sizes=args.batch_sizes,
        fine_tune_stages_range=args.fine_tune_stages_range, backbones=args.backbones,
        epochs_range=args.epochs_range, epochs_step=args.epochs_step,
    )
    result = tune_classifier(args.data, args.out, tune, splits_file=args.splits, overwrite=args.overwrite,
                             retrain_dir=args.retrain, verbose=2 if args.quiet else 1)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    if result.get("role") != "worker":
        print(f"trials.json, best_hyperparameters.json -> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tf-bus",
        description="Breast ultrasound (BUSI) lesion segmentation and classification with Keras 3. "
                    "Stages in data-flow order: synth/check -> stage (S3) / prepare -> eda -> (train, tune, evaluate, export, "
                    "compare, fuse, serve, predict, explain).",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_demo, _add_synth, _add_check, _add_prepare, _add_stage, _add_eda, _add_train_segmenter,
                _add_evaluate_segmenter, _add_train_classifier, _add_evaluate_classifier, _add_tune, _add_compare,
                _add_fuse, _add_fuse_predict, _add_export, _add_serve, _add_predict, _add_explain):
        add(sub)
    return parser


def _version() -> str:
    import tf_bus

    return f"tf-bus {tf_bus.__version__}"


# Commands that never import TensorFlow (tested): the others import it first, quietly.
WITHOUT_TENSORFLOW = ("synth", "check", "prepare", "stage", "compare")


def main(argv: list[str] | None = None) -> int:
    from tf_bus.data.busi import TfBusError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    if args.command not in WITHOUT_TENSORFLOW:
        from tf_bus.tflog import import_tensorflow

        try:
            import_tensorflow()  # now, so that TF_CPP_MIN_LOG_LEVEL hides its start-up lines (tf_bus.tflog)
        except ModuleNotFoundError as e:
            if e.name != "tensorflow":
                raise
            free = [f"`{c}`" for c in WITHOUT_TENSORFLOW]
            print(f"tf-bus {args.command}: error: TensorFlow is not installed for {sys.executable}. It is an extra: "
                  "pip install -e '.[cpu]' (tensorflow-cpu) or -e '.[gpu]' (NVIDIA GPUs); see the README, "
                  f"\"Installing\". {', '.join(free[:-1])} and {free[-1]} run without it.", file=sys.stderr)
            return 2
    try:
        if getattr(args, "cache_dir", "absent") != "absent":
            from tf_bus.staging import local_data

            args.data = local_data(args.data, _stage_config(args), quiet=getattr(args, "quiet", False))
        return args.func(args)
    except (TfBusError, ConfigError) as e:
        print(f"tf-bus {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tf-bus {args.command}: interrupted; outputs are written atomically, nothing half-written was left.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
