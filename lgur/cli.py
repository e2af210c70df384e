"""Command line: `python -m lgur <command>`."""

from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS


def _print_table(rows: list[dict], keys: list[str]) -> None:
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.what == "search":
        result = bench.bench_search(args.checkpoint, args.gallery, repeats=args.repeats, big=args.big)
        print(json.dumps(result, indent=2) if args.json else bench.format_search(result))
        bench.write_json(result, args.out)
        return 0
    if args.what == "app":
        result = bench.bench_app(args.checkpoint, args.gallery, repeats=args.repeats)
        print(json.dumps(result, indent=2))
        bench.write_json(result, args.out)
        return 0
    if args.what == "model":
        rows = [bench.bench_model(p, batch=args.batch, repeats=args.repeats or 5) for p in args.presets]
        result = {"benchmark": "model", "environment": bench.environment(), "presets": rows}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_table(
                rows,
                [
                    "preset",
                    "patch_grid",
                    "atoms",
                    "prototypes",
                    "embedding_dim",
                    "params_trainable",
                    "params_frozen",
                    "ms_per_image",
                    "ms_per_caption",
                ],
            )
        bench.write_json(result, args.out)
        return 0
    raise SystemExit(f"unknown benchmark {args.what!r}")


def cmd_synth(args: argparse.Namespace) -> int:
    import time

    from .synth.world import WorldSpec, generate_world

    spec = WorldSpec(
        seed=args.seed,
        train_identities=args.identities,
        val_identities=args.val_identities,
        test_identities=args.test_identities,
        min_images=args.min_images,
        max_images=args.max_images,
    )
    start = time.perf_counter()
    summary = generate_world(spec, args.out, workers=args.workers, progress=not args.quiet)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    from .synth.world import WorldSpec, write_gallery

    result = write_gallery(args.out, WorldSpec(seed=args.seed), workers=args.workers)
    print(f"wrote {result['images']} images of {result['identities']} identities to {args.out}")
    return 0


def cmd_contact_sheet(args: argparse.Namespace) -> int:
    from .synth.sheet import contact_sheet

    print(contact_sheet(args.data, args.out, split=args.split, count=args.count, columns=args.columns))
    return 0


def cmd_ambiguity(args: argparse.Namespace) -> int:
    from .synth.world import ambiguity_report

    reports = [ambiguity_report(args.data, split) for split in args.splits]
    if args.json:
        print(json.dumps(reports, indent=2))
    else:
        for r in reports:
            ceiling = r["perfect_reader"]
            print(
                f"{r['split']}: {r['captions']} captions over {r['identities']} identities; consistent identities "
                f"per caption mean {r['consistent_identities_mean']:.2f}, "
                f"median {r['consistent_identities_median']:.0f}, "
                f"unique {100 * r['unique_share']:.1f}%; perfect attribute reader R@1 {ceiling['R@1']:.1f} "
                f"R@5 {ceiling['R@5']:.1f} R@10 {ceiling['R@10']:.1f}"
            )
    return 0


def cmd_lexical_probe(args: argparse.Namespace) -> int:
    from .config import preset
    from .encoders import TextEncoder
    from .synth.probe import lexical_probe

    config = preset(args.preset)
    if args.text_encoder:
        config.text.path = args.text_encoder
    report = lexical_probe(TextEncoder(config.text, config.dim).eval())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"nearest concept of a form, by the frozen encoder's token features ({config.text.name}):")
    for kind, r in report["kinds"].items():
        print(
            f"  {kind:15s} {r['concepts']:2d} concepts  held-out forms {r['held_out_accuracy']:5.1f}% "
            f"({r['held_out_forms']})  training forms {r['train_accuracy']:5.1f}% ({r['train_forms_tested']})  "
            f"chance {r['chance']:.1f}%"
        )
    print(
        f"  all: held-out {report['held_out_accuracy']:.1f}% of {report['held_out_forms']} forms, "
        f"training {report['train_accuracy']:.1f}%, chance {report['chance']:.1f}%"
    )
    misses = [e for e in report["examples"] if e["nearest"] != e["concept"]]
    for e in misses[: args.show]:
        own, best = e["cosine_own"], e["cosine_nearest"]
        print(f"  {e['held_out']!r} ({e['concept']}) -> {e['nearest']}: cosine {best} vs {own} to its own")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import recipe, train

    overrides = dict(item.split("=", 1) for item in args.set or [])
    cfg = recipe(
        args.preset,
        data=args.data,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_backbone=args.lr_backbone,
        seed=args.seed,
        max_minutes=args.max_minutes,
        stop_after=args.stop_after,
        samples=args.samples,
        instances=args.instances,
        sdm=args.sdm,
        caption_crops=args.caption_crops,
        crops_from_epoch=args.crops_from_epoch,
        text_encoder_path=args.text_encoder,
        image_pretrained_path=args.image_weights,
        cache_dir=args.cache,
        threads=args.threads,
        model_overrides=overrides,
        use_dga=not args.no_dga,
        use_pgu=not args.no_pgu,
        prototype_diversity=args.prototype_diversity,
    )
    result = train(cfg, progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .data.dataset import build_split, text_features
    from .data.readers import read_dataset
    from .evaluate import attribute_breakdown, evaluate_split, plot_cmc

    model, card = load_checkpoint(args.checkpoint, args.text_encoder)
    records, _ = read_dataset(args.data)
    split_records = [r for r in records if r.split == args.split]
    if not split_records:
        raise SystemExit(f"no entries in split {args.split!r} of {args.data}")
    split = build_split(split_records, model.config.image.img_size)
    result = evaluate_split(model, split, text_features(model.text_encoder, split.captions, args.cache))
    report = {
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "standard": {k: round(v, 2) for k, v in result["standard"].items() if k != "cmc"},
        "exclude_own_image": {k: round(v, 2) for k, v in result["exclude_own_image"].items() if k != "cmc"},
    }
    side = Path(args.data) / "synthetic_attributes.json"
    if side.is_file():
        key = "paraphrase_mentions" if args.split == "test-paraphrase" else "mentions"
        report["by_attribute"] = attribute_breakdown(result["similarity"], split, side, key)
    if args.cmc:
        plot_cmc({args.split: result["standard"]["cmc"]}, args.cmc)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in ("standard", "exclude_own_image"):
            m = report[name]
            print(
                f"{name:18s} R@1 {m['R@1']:.2f}  R@5 {m['R@5']:.2f}  R@10 {m['R@10']:.2f}  mAP {m['mAP']:.2f}"
                f"  ({m['queries']} queries)"
            )
        for kind, m in report.get("by_attribute", {}).items():
            print(f"  captions mentioning {kind:16s} R@1 {m['R@1']:.2f} ({m['captions']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write an inference checkpoint; with --data, evaluate *it* and record those metrics in its card."""
    from pathlib import Path

    from .checkpoint import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(args.checkpoint)
    keep = {k: v for k, v in card.items() if k in ("training", "data")}
    run = Path(args.checkpoint).parent / "result.json"
    if run.is_file():
        result = json.loads(run.read_text())
        keep.setdefault("training", {}).update(
            {k: result[k] for k in ("train_seconds", "total_seconds", "best_epoch") if k in result}
        )
    if args.command:
        keep.setdefault("training", {})["command"] = args.command
    world = Path(args.data or "") / "world.json"
    if args.data and world.is_file():  # the synthetic world's recipe: seed, sizes, vocabulary
        keep.setdefault("data", {})["world"] = json.loads(world.read_text())
    if card.get("metrics"):
        keep["metrics_before_export"] = card["metrics"]
    path = save_checkpoint(model, args.out, keep, dtype=args.dtype)
    card = None  # the exported card, once measurements are added to it
    if args.data:
        from .data.readers import read_dataset
        from .train import score_test_splits, split_records

        records, _ = read_dataset(args.data)
        splits = split_records(records, seed=0)
        score_test_splits(path, args.data, splits, Path(args.cache), None, path.parent)
        card = json.loads(path.with_suffix(".json").read_text())
        for name, m in card["metrics"].items():
            print(f"{name}: R@1 {m['R@1']} R@5 {m['R@5']} R@10 {m['R@10']} mAP {m['mAP']}")
        if (Path(args.data) / "synthetic_attributes.json").is_file():  # part labels: measure the explanations
            from .quality import explanation_quality, format_quality

            exported, _ = load_checkpoint(path)
            card["explanations"] = explanation_quality(exported, args.data, "test")
            print(format_quality(card["explanations"]))
    if args.gallery:  # short typed queries against the gallery the app ships
        from .querybench import format_query_bench, run_query_bench

        card = card or json.loads(path.with_suffix(".json").read_text())
        card["query_bench"] = {}
        for style in ("default", "check"):
            bench = run_query_bench(path, args.gallery, style)
            print(format_query_bench(bench, show=0))
            card["query_bench"][style] = {k: bench[k] for k in ("queries", "precision@10", "top1", "chance")}
    if card is not None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(path.with_suffix(".json"), json.dumps(card, indent=2).encode())
    print(path)
    return 0


DEFAULT_CHECKPOINT = "assets/lgur_cpu.safetensors"
DEFAULT_GALLERY = "gallery"


def cmd_index(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from .checkpoint import checkpoint_fingerprint, load_checkpoint
    from .index import load_index, merge_shards, save_index, scan_gallery, update_index

    gallery = Path(args.gallery).resolve()
    if not gallery.is_dir():
        raise SystemExit(f"gallery folder {gallery} does not exist")
    index_dir = Path(args.index_dir).resolve() if args.index_dir else gallery / ".lgur-index"
    model, _ = load_checkpoint(args.checkpoint)
    fingerprint = checkpoint_fingerprint(args.checkpoint)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: each process embeds one shard, the first merges them
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        files = scan_gallery(gallery, index_dir)[rank::world]
        shard_dir = index_dir / f"shard-{rank}"
        _, report = update_index(model, fingerprint, gallery, shard_dir, files=files, progress=rank == 0)
        dist.barrier()
        if rank == 0:
            shards = [load_index(gallery, index_dir / f"shard-{r}", fingerprint) for r in range(world)]
            merged = merge_shards(shards, gallery)
            save_index(merged, index_dir)
            print(f"merged {world} shards: {len(merged)} images indexed in {index_dir}")
        dist.destroy_process_group()
        return 0
    index, report = update_index(model, fingerprint, gallery, index_dir, progress=not args.quiet)
    print(f"{len(index)} images indexed in {index_dir} ({index.kind}); {report.summary()}")
    for item in report.rejected:
        print(f"  rejected {item['path']}: {item['reason']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import QueryError, SearchEngine

    engine, _ = SearchEngine.open(args.checkpoint, args.gallery, args.index_dir)
    try:
        response = engine.search(args.query, args.k)
    except QueryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(response.to_json(), indent=2))
        return 0
    for r in response.results:
        parts = " ".join(f"{x:+.2f}" for x in r.part_similarity)
        print(f"{r.rank:3d}  {r.score:.4f}  {r.file}  parts [{parts}]")
    return 0


def cmd_explain_quality(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .quality import explanation_quality, format_quality

    model, _ = load_checkpoint(args.checkpoint)
    result = explanation_quality(model, args.data, args.split, args.limit)
    print(json.dumps(result, indent=2) if args.json else format_quality(result))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


def cmd_ablation(args: argparse.Namespace) -> int:
    from .ablation import run_ablation

    result = run_ablation(args.data, args.out, args.epochs, args.cache, args.seed, progress=not args.quiet)
    print(result["table"])
    return 0


def cmd_query_bench(args: argparse.Namespace) -> int:
    from .querybench import format_query_bench, run_query_bench

    result = run_query_bench(args.checkpoint, args.gallery, args.set, args.count, args.seed)
    print(json.dumps(result, indent=2) if args.json else format_query_bench(result))
    if args.out:
        from pathlib import Path

        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(Path(args.out), json.dumps(result, indent=2).encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lgur", description="LGUR Explorer: text-based person search")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="measure speed and size (prints figures, optionally JSON)")
    bench.add_argument("what", choices=["model", "search", "app"], help="what to benchmark")
    bench.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    bench.add_argument("--gallery", default=DEFAULT_GALLERY)
    bench.add_argument("--big", type=int, default=100_000, help="size of the synthetic-embedding gallery")
    bench.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"])
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 5 model, 50 search)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--out", help="also write the JSON result to this file")
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train", help="train LGUR (seeded, resumable; torchrun for several processes)")
    train.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    train.add_argument("--data", required=True, help="dataset folder (CUHK-PEDES, ICFG-PEDES, RSTPReid or synthetic)")
    train.add_argument("--out", required=True, help="run folder: checkpoints, logs, curves")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="LSTM, projections and classifiers")
    train.add_argument("--lr-backbone", type=float, help="image encoder, DGA and PGU")
    train.add_argument("--seed", type=int)
    train.add_argument(
        "--samples",
        choices=["captions", "images", "identities"],
        help="an epoch visits every caption, every image, or every identity (--instances images each, in one batch)",
    )
    train.add_argument("--instances", type=int, help="images per identity in a batch, with --samples identities")
    train.add_argument("--caption-crops", type=float, help="share of samples whose caption is cut to a few clauses")
    train.add_argument("--crops-from-epoch", type=int, help="first epoch (0-based) that uses caption crops")
    train.add_argument("--sdm", type=float, help="weight of the similarity distribution matching loss (0 = paper)")
    train.add_argument("--max-minutes", type=float, help="stop training after this long (then test the best)")
    train.add_argument("--stop-after", type=int, help="end this invocation after N epochs (run again to resume)")
    train.add_argument("--text-encoder", help="local folder of the frozen text encoder")
    train.add_argument("--image-weights", help="local .safetensors of ImageNet weights for the image encoder")
    train.add_argument("--cache", help="folder for cached text features (default RUN/cache)")
    train.add_argument("--threads", type=int)
    train.add_argument("--no-dga", action="store_true", help="ablation: without DGA")
    train.add_argument("--no-pgu", action="store_true", help="ablation: without PGU (mean pooling)")
    train.add_argument("--prototype-diversity", type=float,
                       help="not in the paper: weight of a penalty on overlapping prototype attention")  # fmt: skip
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model config overrides, e.g. image.depth=6")
    train.add_argument("--quiet", action="store_true")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="R@1/5/10 and mAP (CUHK-PEDES protocol) of a checkpoint")
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--text-encoder", help="local folder of the frozen text encoder")
    evaluate.add_argument("--cache", default="cache", help="folder for cached text features")
    evaluate.add_argument("--cmc", help="write the CMC curve to this PNG")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export", help="write an inference checkpoint with its card")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument(
        "--dtype", choices=["float32", "float16", "int8"], default="float32",
        help="storage precision: int8 = per-row codes for matrices, float16 vectors (about 2x smaller than float16)",
    )  # fmt: skip
    export.add_argument("--data", help="evaluate the exported checkpoint on this dataset's test splits (into its card)")
    export.add_argument("--gallery", help="run query-bench on this gallery (into its card)")
    export.add_argument("--cache", default="cache", help="folder for cached text features")
    export.add_argument("--command", help="the training command, recorded in the card")
    export.set_defaults(func=cmd_export)

    index = sub.add_parser("index", help="index a gallery folder (incremental; torchrun shards it)")
    index.add_argument("gallery", nargs="?", default=DEFAULT_GALLERY)
    index.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    index.add_argument("--index-dir", help="where the index lives (default GALLERY/.lgur-index)")
    index.add_argument("--quiet", action="store_true")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="search a gallery by description")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--gallery", default=DEFAULT_GALLERY)
    search.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    search.add_argument("--index-dir")
    search.add_argument("--json", action="store_true")
    search.set_defaults(func=cmd_search)

    ablation = sub.add_parser("ablation", help="train baseline, +DGA, +PGU and full LGUR with one budget")
    ablation.add_argument("--data", required=True)
    ablation.add_argument("--out", default="runs/ablation")
    ablation.add_argument("--epochs", type=int, default=3)
    ablation.add_argument("--cache", help="shared folder for cached text features")
    ablation.add_argument("--seed", type=int, default=0)
    ablation.add_argument("--quiet", action="store_true")
    ablation.set_defaults(func=cmd_ablation)

    quality = sub.add_parser("explain-quality", help="foreground AUC and prototype part shares vs part labels")
    quality.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    quality.add_argument("--data", required=True, help="a world folder written by `synth`")
    quality.add_argument("--split", default="test")
    quality.add_argument("--limit", type=int, help="only the first N images")
    quality.add_argument("--json", action="store_true")
    quality.add_argument("--out", help="also write the JSON here")
    quality.set_defaults(func=cmd_explain_quality)

    qb = sub.add_parser("query-bench", help="short typed queries: attribute precision@10 against the gallery")
    qb.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    qb.add_argument("--gallery", default=DEFAULT_GALLERY, help="a gallery folder with manifest.json attributes")
    qb.add_argument("--set", default="default", choices=["default", "check"], help="which phrasings")
    qb.add_argument("--count", type=int, default=200)
    qb.add_argument("--seed", type=int, default=0)
    qb.add_argument("--json", action="store_true")
    qb.add_argument("--out", help="also write the JSON here")
    qb.set_defaults(func=cmd_query_bench)

    synth = sub.add_parser("synth", help="generate a synthetic pedestrian world (CUHK-PEDES layout)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--identities", type=int, default=4000, help="training identities")
    synth.add_argument("--val-identities", type=int, default=200)
    synth.add_argument("--test-identities", type=int, default=800)
    synth.add_argument("--min-images", type=int, default=2, help="images per identity, at least")
    synth.add_argument("--max-images", type=int, default=3, help="images per identity, at most")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(func=cmd_synth)

    gallery = sub.add_parser("gallery", help="regenerate the shipped gallery (the default world's test split)")
    gallery.add_argument("--out", default="gallery")
    gallery.add_argument("--seed", type=int, default=0)
    gallery.add_argument("--workers", type=int, default=None)
    gallery.set_defaults(func=cmd_gallery)

    sheet = sub.add_parser("contact-sheet", help="a grid of generated people with one caption each")
    sheet.add_argument("--data", required=True, help="a world folder written by `synth`")
    sheet.add_argument("--out", default="assets/contact_sheet.jpg")
    sheet.add_argument("--split", default="test")
    sheet.add_argument("--count", type=int, default=16)
    sheet.add_argument("--columns", type=int, default=8)
    sheet.set_defaults(func=cmd_contact_sheet)

    ambiguity = sub.add_parser("ambiguity", help="how many identities fit each caption; a perfect reader's recall")
    ambiguity.add_argument("--data", required=True, help="a world folder written by `synth`")
    ambiguity.add_argument("--splits", nargs="+", default=["test", "test-paraphrase"])
    ambiguity.add_argument("--json", action="store_true")
    ambiguity.set_defaults(func=cmd_ambiguity)

    probe = sub.add_parser("lexical-probe", help="does the frozen text encoder map held-out synonyms to their concept?")
    probe.add_argument("--preset", default="cpu", choices=["cpu", "paper"])
    probe.add_argument("--text-encoder", help="path of the frozen text encoder (default: the preset's)")
    probe.add_argument("--show", type=int, default=10, help="print this many misses")
    probe.add_argument("--json", action="store_true")
    probe.set_defaults(func=cmd_lexical_probe)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
