"""Command line: `python -m lgur <command>`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from .files import DEFAULT_CHECKPOINT, DEFAULT_GALLERY
from .model.config import PRESETS, DetailTrainConfig
from .training.config import TrainConfig, flag
from .training.lineage import LineageConfig

# Options that several commands share, each a parent parser.
Subcommands = argparse._SubParsersAction


def option(*flags: str, **kwargs) -> argparse.ArgumentParser:
    """A parent parser holding one option that several commands share."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(*flags, **kwargs)
    return parent


SHIPPED = option(
    "--checkpoint", default=DEFAULT_CHECKPOINT, help="a .safetensors checkpoint (default: the shipped one)"
)
GIVEN = option("--checkpoint", required=True, help="a .safetensors checkpoint")
GALLERY = option("--gallery", default=DEFAULT_GALLERY, help="a gallery folder (default: the shipped one)")
JSON = option("--json", action="store_true", help="print JSON")
OUT = option("--out", help="also write the JSON result to this file")
QUIET = option("--quiet", action="store_true", help="no progress bars")
SEED = option("--seed", type=int, default=0)
CACHE = option("--cache", default="cache", help="folder for cached text features")
TEXT_ENCODER = option("--text-encoder", help="local folder of the frozen text encoder")
INDEX_DIR = option("--index-dir", help="where the index lives (default GALLERY/.lgur-index)")


def hub_options() -> argparse.ArgumentParser:
    """--hub-repo/--hub-file/--hub-revision: the checkpoint from a Hugging Face Hub repository (as the app)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--hub-repo", help="fetch the checkpoint and its card from this Hub repository")
    parent.add_argument("--hub-file", help="the checkpoint's path in that repository (default lgur_cpu.safetensors)")
    parent.add_argument("--hub-revision", help="the commit to pin")
    return parent


HUB = hub_options()


def checkpoint_of(args: argparse.Namespace):  # -> Path
    from .model.checkpoint import resolve_checkpoint

    return resolve_checkpoint(args.checkpoint, args.hub_repo, args.hub_file, args.hub_revision)


def _write_json(result: dict, out: str | None) -> None:
    if out:
        from .files import atomic_write_bytes

        atomic_write_bytes(out, json.dumps(result, indent=2).encode())


def bench_parser(sub: Subcommands) -> None:
    """`bench`'s options."""
    parser = sub.add_parser(
        "bench", parents=[SHIPPED, GALLERY, JSON, OUT], help="measure speed and size (prints figures, optionally JSON)"
    )
    parser.add_argument(
        "what",
        choices=["model", "search", "app", "hostile"],
        help="what to benchmark (hostile: search under a flood and costly uploads)",
    )
    parser.add_argument("--big", type=int, default=100_000, help="size of the synthetic-embedding gallery")
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default: 5 model, 50 search)")
    parser.add_argument("--app", default="app.py", help="with `app`: the app to start (default ./app.py)")
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval import bench

    if args.what == "search":
        result = bench.bench_search(args.checkpoint, args.gallery, repeats=args.repeats, big=args.big)
        text = bench.format_search(result)
    elif args.what == "app":
        result = bench.bench_app(args.checkpoint, args.gallery, repeats=args.repeats, app=args.app)
        text = json.dumps(result, indent=2)
    elif args.what == "hostile":
        result = bench.bench_hostile(args.checkpoint, args.gallery, app=args.app)
        text = json.dumps(result, indent=2)
    else:
        rows = [bench.bench_model(p, batch=args.batch, repeats=args.repeats or 5) for p in args.presets]
        result = {"benchmark": "model", "environment": bench.environment(), "presets": rows}
        text = bench.format_model(rows)
    print(json.dumps(result, indent=2) if args.json else text)
    _write_json(result, args.out)
    return 0


def synth_parser(sub: Subcommands) -> None:
    """`synth`'s options."""
    parser = sub.add_parser(
        "synth", parents=[SEED, QUIET], help="generate a synthetic pedestrian world (CUHK-PEDES layout)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--identities", type=int, default=4000, help="training identities")
    parser.add_argument("--val-identities", type=int, default=200)
    parser.add_argument("--test-identities", type=int, default=800)
    parser.add_argument("--min-images", type=int, default=2, help="images per identity, at least")
    parser.add_argument("--max-images", type=int, default=3, help="images per identity, at most")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument(
        "--framing",
        choices=("world", "detector"),
        default="world",
        help="detector: the same images framed as a person detector frames its crops",
    )
    parser.add_argument("--splits", default=None, help="comma-separated, e.g. val,test (default: all)")
    parser.set_defaults(func=cmd_synth)


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth.world import SPLITS, WorldSpec, generate_world

    spec = WorldSpec(
        seed=args.seed,
        train_identities=args.identities,
        val_identities=args.val_identities,
        test_identities=args.test_identities,
        min_images=args.min_images,
        max_images=args.max_images,
        framing=args.framing,
    )
    start = time.perf_counter()
    splits = tuple(args.splits.split(",")) if args.splits else SPLITS
    summary = generate_world(spec, args.out, workers=args.workers, progress=not args.quiet, splits=splits)
    print(json.dumps(summary | {"seconds": round(time.perf_counter() - start, 1)}, indent=2))
    return 0


def gallery_parser(sub: Subcommands) -> None:
    """`gallery`'s options."""
    parser = sub.add_parser(
        "gallery", parents=[SEED], help="regenerate the shipped gallery (the default world's test split)"
    )
    parser.add_argument("--out", default="gallery")
    parser.add_argument("--workers", type=int, default=None)
    parser.set_defaults(func=cmd_gallery)


def cmd_gallery(args: argparse.Namespace) -> int:
    from .synth.world import WorldSpec, write_gallery

    result = write_gallery(args.out, WorldSpec(seed=args.seed), workers=args.workers)
    print(f"wrote {result['images']} images of {result['identities']} identities to {args.out}")
    return 0


def contact_sheet_parser(sub: Subcommands) -> None:
    """`contact-sheet`'s options."""
    parser = sub.add_parser("contact-sheet", help="a grid of generated people with one caption each")
    parser.add_argument("--data", required=True, help="a world folder written by `synth`")
    parser.add_argument("--out", default="assets/contact_sheet.jpg")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--columns", type=int, default=8)
    parser.set_defaults(func=cmd_contact_sheet)


def cmd_contact_sheet(args: argparse.Namespace) -> int:
    from .synth.sheet import contact_sheet

    print(contact_sheet(args.data, args.out, split=args.split, count=args.count, columns=args.columns))
    return 0


def ambiguity_parser(sub: Subcommands) -> None:
    """`ambiguity`'s options."""
    parser = sub.add_parser(
        "ambiguity", parents=[JSON], help="how many identities fit each caption; a perfect reader's recall"
    )
    parser.add_argument("--data", required=True, help="a world folder written by `synth`")
    parser.add_argument("--splits", nargs="+", default=["test", "test-paraphrase"])
    parser.set_defaults(func=cmd_ambiguity)


def cmd_ambiguity(args: argparse.Namespace) -> int:
    from .synth.world import ambiguity_report, format_ambiguity

    reports = [ambiguity_report(args.data, split) for split in args.splits]
    print(json.dumps(reports, indent=2) if args.json else format_ambiguity(reports))
    return 0


def lexical_probe_parser(sub: Subcommands) -> None:
    """`lexical-probe`'s options."""
    parser = sub.add_parser(
        "lexical-probe", parents=[JSON], help="does the frozen text encoder map held-out synonyms to their concept?"
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--text-encoder", help="path of the frozen text encoder (default: the preset's)")
    parser.add_argument("--show", type=int, default=10, help="print this many misses")
    parser.set_defaults(func=cmd_lexical_probe)


def cmd_lexical_probe(args: argparse.Namespace) -> int:
    from .eval.lexical_probe import format_lexical_probe, lexical_probe
    from .model.config import preset
    from .model.encoders import TextEncoder

    config = preset(args.preset)
    if args.text_encoder:
        config.text.path = args.text_encoder
    report = lexical_probe(TextEncoder(config.text, config.dim).eval())
    print(json.dumps(report, indent=2) if args.json else format_lexical_probe(report, config.text.name, args.show))
    return 0


def _comma_list(kind: type, one: bool = False) -> Callable[[str], Any]:
    """Parse "a,b,c" into a tuple of `kind`; with `one`, a single value stays a plain value."""

    def parse(text: str) -> Any:
        values = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        return values[0] if one and len(values) == 1 else values

    return parse


def config_options(parser: argparse.ArgumentParser, config: type) -> list[str]:
    """One option per field of a config dataclass (its metadata: help, choices, flag, required; cli False:
    Python only), defaulting to None so the recipe's value stands. -> the fields added."""
    added = []
    for f in dataclasses.fields(config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        name = flag(f)
        kind = str(f.type).replace(" | None", "")
        shown = "" if f.default is dataclasses.MISSING or f.default is None else f" ({config.__name__}: {f.default})"
        common = {"dest": f.name, "help": meta.get("help", "") + shown}
        if meta.get("required"):
            common["required"] = True
        if kind == "bool":
            parser.add_argument(name, action="store_const", const=not meta.get("negate", False), **common)
        elif kind.startswith("tuple") or kind.startswith("float | tuple"):
            item = {"int": int, "float": float, "str": str}[kind.split("[")[1].split(",")[0]]
            parse = _comma_list(item, one=kind.startswith("float | tuple"))
            parser.add_argument(name, type=parse, metavar="A,B,...", **common)
        else:
            parser.add_argument(
                name, type={"int": int, "float": float, "str": str}[kind], choices=meta.get("choices"), **common
            )
        added.append(f.name)
    return added


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that `python -m lgur train` runs with these arguments."""
    from .training.config import recipe

    return recipe(
        args.preset,
        text_encoder_path=args.text_encoder,
        image_pretrained_path=args.image_weights,
        model_overrides=dict(item.split("=", 1) for item in args.set or []),
        use_dga=not args.no_dga,
        use_pgu=not args.no_pgu,
        **{name: getattr(args, name) for name in args.config_fields},
    )


def train_parser(sub: Subcommands) -> None:
    """`train`'s options."""
    parser = sub.add_parser(
        "train", parents=[TEXT_ENCODER, QUIET], help="train LGUR (seeded, resumable; torchrun for several processes)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the model and its recipe")
    fields = config_options(parser, TrainConfig)
    parser.add_argument("--image-weights", help="local .safetensors of ImageNet weights for the image encoder")
    parser.add_argument("--no-dga", action="store_true", help="ablation: without DGA")
    parser.add_argument("--no-pgu", action="store_true", help="ablation: without PGU (mean pooling)")
    parser.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="model config overrides, e.g. image.depth=6")
    parser.set_defaults(func=cmd_train, config_fields=fields)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import train

    print(json.dumps(train(train_config(args), progress=not args.quiet), indent=2))
    return 0


def lineage_parser(sub: Subcommands) -> None:
    """`lineage`'s options."""
    parser = sub.add_parser(
        "lineage",
        parents=[QUIET],
        help="train the shipped model: every stage in order, each resumed or skipped when rerun (README)",
    )
    parser.add_argument("--data", required=True, help="the synthetic world (python -m lgur synth)")
    parser.add_argument("--out", required=True, help="a folder for the stages; the model is OUT/lgur_cpu.safetensors")
    parser.add_argument(
        "--no-teacher", dest="teacher", action="store_false", help="leave out the teacher and the run it teaches"
    )
    parser.add_argument(
        "--teacher-stop-after",
        type=int,
        metavar="EPOCH",
        help=f"end the retriever (the teacher's input) after this epoch (default {LineageConfig.teacher_stop_after})",
    )
    parser.add_argument("--gallery", help="also measure the exported model on this gallery (as the shipped card)")
    parser.add_argument("--cache", help="folder for cached text features (default OUT/cache)")
    parser.add_argument(
        "--framed",
        help="also measure the exported model on this detector-framed world of the "
        "same seed (synth --framing detector): retrieval, explanations beside templates",
    )
    parser.add_argument("--print", action="store_true", help="print each stage's command, in order, and run nothing")
    parser.set_defaults(func=cmd_lineage)


def cmd_lineage(args: argparse.Namespace) -> int:
    from .training.lineage import lineage

    chosen = {"teacher_stop_after": args.teacher_stop_after} if args.teacher_stop_after is not None else {}
    cfg = LineageConfig(
        data=args.data,
        out=args.out,
        teacher=args.teacher,
        gallery=args.gallery,
        cache=args.cache,
        framed=args.framed,
        **chosen,
    )
    if args.print:
        from .training.lineage import stage_commands

        print(stage_commands(cfg))
        return 0
    try:
        print(lineage(cfg, progress=not args.quiet, report=_silent if args.quiet else print))
    except (ValueError, OSError) as error:  # a bad dataset or folder: say which, no traceback
        raise SystemExit(f"lineage: {error}") from None
    return 0


def evaluate_parser(sub: Subcommands) -> None:
    """`evaluate`'s options."""
    parser = sub.add_parser(
        "evaluate",
        parents=[GIVEN, TEXT_ENCODER, CACHE, JSON],
        help="R@1/5/10 and mAP (CUHK-PEDES protocol) of a checkpoint",
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--cmc", help="write the CMC curve to this PNG")
    parser.add_argument(
        "--colour-grounding",
        action="store_true",
        help="read caption colour words the model never saw as the nearest training colour (lgur.search.colours)",
    )
    parser.add_argument(
        "--read-as-app",
        action="store_true",
        help="read captions as the app reads queries: colour grounding and word forms (lgur.search.reading)",
    )
    parser.add_argument(
        "--details",
        action="store_true",
        help="add the detail detector's score to the cosine (as the app ranks; lgur.model.details)",
    )
    parser.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.readers import read_dataset
    from .eval.evaluate import evaluation_report, format_metrics, plot_cmc, split_metrics
    from .model.checkpoint import load_checkpoint
    from .search.query import QueryReader

    model, card = load_checkpoint(args.checkpoint, args.text_encoder)
    records = [r for r in read_dataset(args.data)[0] if r.split == args.split]
    if not records:
        raise SystemExit(f"no entries in split {args.split!r} of {args.data}")
    reader = None
    if args.colour_grounding or args.read_as_app:
        if not card.get("vocabulary"):
            raise SystemExit(f"{args.checkpoint}: its card records no training vocabulary, so no query reading")
        reader = QueryReader(card["vocabulary"], model.config.detail_terms, forms=args.read_as_app)
    if args.details and (model.details is None or not model.config.detail_weight):
        raise SystemExit(f"{args.checkpoint}: no detail detector with a weight (python -m lgur train-details)")
    metrics, cmc = split_metrics(model, records, args.split, args.data, args.cache, reader, args.details)
    if args.cmc:
        plot_cmc({args.split: cmc}, args.cmc)
    print(
        json.dumps(evaluation_report(args.checkpoint, args.split, metrics), indent=2)
        if args.json
        else format_metrics(metrics)
    )
    return 0


def train_details_parser(sub: Subcommands) -> None:
    """`train-details`'s options: one per field of DetailTrainConfig."""
    parser = sub.add_parser(
        "train-details",
        parents=[GIVEN, TEXT_ENCODER, CACHE, QUIET],
        help="train a detail detector on a checkpoint's frozen image encoder; write the checkpoint with it",
    )
    parser.add_argument("--data", required=True, help="the dataset the checkpoint was trained on (train/val)")
    parser.add_argument("--out", required=True, help="the new checkpoint (.safetensors)")
    fields = config_options(parser, DetailTrainConfig)
    parser.set_defaults(func=cmd_train_details, config_fields=fields)


def details_config(args: argparse.Namespace) -> DetailTrainConfig:
    """The DetailTrainConfig that `python -m lgur train-details` runs with these arguments."""
    chosen = {name: getattr(args, name) for name in args.config_fields}
    return DetailTrainConfig(**{name: value for name, value in chosen.items() if value is not None})


def cmd_train_details(args: argparse.Namespace) -> int:
    from .training.details import train_details

    cfg = details_config(args)
    report = print if not args.quiet else _silent
    try:
        print(train_details(args.checkpoint, args.data, args.out, cfg, args.cache, report, args.text_encoder))
    except (ValueError, OSError) as error:  # a bad checkpoint or dataset: say which, no traceback
        raise SystemExit(f"train-details: {error}") from None


def fit_foreground_parser(sub: Subcommands) -> None:
    """`fit-foreground`'s options."""
    parser = sub.add_parser(
        "fit-foreground",
        parents=[GIVEN, TEXT_ENCODER, QUIET],
        help="fit DGA's foreground weight m to the detail detector's person map; write the checkpoint with it",
    )
    parser.add_argument("--data", required=True, help="the dataset the checkpoint was trained on (train/val)")
    parser.add_argument("--out", required=True, help="the new checkpoint (.safetensors)")
    parser.add_argument(
        "--images", type=int, default=DetailTrainConfig.foreground_images, help="training images to fit on"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_fit_foreground)


def cmd_fit_foreground(args: argparse.Namespace) -> int:
    from .training.foreground import fit_foreground_checkpoint

    report = print if not args.quiet else _silent
    try:
        path = fit_foreground_checkpoint(
            args.checkpoint, args.data, args.out, args.images, args.seed, report, args.text_encoder
        )
    except (ValueError, OSError) as error:
        raise SystemExit(f"fit-foreground: {error}") from None
    print(path)
    return 0


def _silent(_: str) -> None:
    pass


def export_parser(sub: Subcommands) -> None:
    """`export`'s options."""
    parser = sub.add_parser("export", parents=[GIVEN, CACHE], help="write an inference checkpoint with its card")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "int8"],
        default="float32",
        help="storage precision: int8 = per-row codes for matrices, float16 vectors (about 2x smaller than float16)",
    )
    parser.add_argument("--data", help="evaluate the exported checkpoint on this dataset's test splits (into its card)")
    parser.add_argument("--gallery", help="run query-bench on this gallery (into its card)")
    parser.add_argument("--command", help="the training command, recorded in the card")
    parser.add_argument("--framed", help="also measure it on this detector-framed world (with --data)")
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Write an inference checkpoint; with --data, evaluate *it* and record those metrics in its card."""
    from .training.export import export_checkpoint

    path = export_checkpoint(
        args.checkpoint, args.out, args.dtype, args.data, args.gallery, args.cache, args.command, framed=args.framed
    )
    print(path)
    return 0


def index_parser(sub: Subcommands) -> None:
    """`index`'s options."""
    parser = sub.add_parser(
        "index",
        parents=[SHIPPED, HUB, INDEX_DIR, QUIET],
        help="index a gallery folder (incremental; torchrun shards it)",
    )
    parser.add_argument("gallery", nargs="?", default=DEFAULT_GALLERY)
    parser.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .model.checkpoint import checkpoint_fingerprint, load_checkpoint
    from .model.serving import fold_for_serving
    from .search.index import default_index_dir, index_gallery

    gallery = Path(args.gallery).resolve()
    if not gallery.is_dir():
        raise SystemExit(f"gallery folder {gallery} does not exist")
    index_dir = Path(args.index_dir).resolve() if args.index_dir else default_index_dir(gallery)
    model, card = load_checkpoint(checkpoint_of(args))
    fold_for_serving(model)
    text = index_gallery(model, checkpoint_fingerprint(card), gallery, index_dir, progress=not args.quiet)
    if text:
        print(text)
    return 0


def search_parser(sub: Subcommands) -> None:
    """`search`'s options."""
    parser = sub.add_parser(
        "search", parents=[SHIPPED, HUB, GALLERY, INDEX_DIR, JSON], help="search a gallery by description"
    )
    parser.add_argument("query")
    parser.add_argument("-k", type=int, default=10)
    parser.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    from .search.engine import SearchEngine, format_results
    from .search.query import QueryError, result_count

    try:
        k = result_count(args.k)
    except QueryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    engine, _ = SearchEngine.open(checkpoint_of(args), args.gallery, args.index_dir)
    try:
        response = engine.search(args.query, k)
    except QueryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(response.to_json(), indent=2) if args.json else format_results(response))
    return 0


def space_parser(sub: Subcommands) -> None:
    """`space`'s options."""
    parser = sub.add_parser("space", help="write exactly what a Hugging Face Space needs into a new folder")
    parser.add_argument("out", help="a folder that does not exist yet")
    parser.set_defaults(func=cmd_space)


def cmd_space(args: argparse.Namespace) -> int:
    from .app.space import format_report, write_space

    try:
        print(format_report(write_space(args.out)))
    except (FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def explain_quality_parser(sub: Subcommands) -> None:
    """`explain-quality`'s options."""
    parser = sub.add_parser(
        "explain-quality", parents=[SHIPPED, JSON, OUT], help="foreground AUC and prototype part shares vs part labels"
    )
    parser.add_argument("--data", required=True, help="a world folder written by `synth`")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--framed",
        help="a detector-framed world of the same seed (synth --framing detector): "
        "the measures beside templates that ignore the image (lgur.eval.faithfulness)",
    )
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument(
        "--details",
        action="store_true",
        help="also probe which attributes the encoder's part features and the embedding carry",
    )
    parser.set_defaults(func=cmd_explain_quality)


def cmd_explain_quality(args: argparse.Namespace) -> int:
    from .eval.quality import explanation_quality, format_quality
    from .model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(args.checkpoint)
    if args.framed:  # the measures a template must fail, on detector-framed images and counterfactuals
        from .eval.faithfulness import faithfulness, format_faithfulness

        result = faithfulness(model, args.data, args.framed, args.split, args.limit)
        print(json.dumps(result, indent=2) if args.json else format_faithfulness(result))
    else:
        from .eval.faithfulness import part_points

        points = part_points(args.data)  # every pointing game beside a fixed point per part
        result = explanation_quality(model, args.data, args.split, args.limit, details=args.details, points=points)
        print(json.dumps(result, indent=2) if args.json else format_quality(result))
    _write_json(result, args.out)
    return 0


def ablation_parser(sub: Subcommands) -> None:
    """`ablation`'s options."""
    parser = sub.add_parser(
        "ablation", parents=[SEED, QUIET], help="train baseline, +DGA, +PGU and full LGUR with one budget"
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", help="shared folder for cached text features")
    parser.add_argument(
        "--preset", default="cpu", choices=["cpu", "cpu-lite0"], help="recipe of the four variants (default: cpu)"
    )
    parser.set_defaults(func=cmd_ablation)


def cmd_ablation(args: argparse.Namespace) -> int:
    from .training.ablation import run_ablation

    result = run_ablation(
        args.data, args.out, args.epochs, args.cache, args.seed, progress=not args.quiet, preset=args.preset
    )
    print(result["table"])
    return 0


def experiments_parser(sub: Subcommands) -> None:
    """`experiments`'s options."""
    parser = sub.add_parser(
        "experiments",
        parents=[GALLERY, SEED, QUIET],
        help="the CPU recipe and one change of each option beyond the paper, at the ablation's budget",
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default="runs/ablation", help="shared with `ablation` (its full-LGUR run)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cache", help="shared folder for cached text features")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="train only these rows (finished ones show)")
    parser.add_argument(
        "--table",
        choices=["recipe", "trunk"],
        default="recipe",
        help="recipe: options beyond the paper against the cpu recipe; trunk: the pretrained trunk's settings",
    )
    parser.set_defaults(func=cmd_experiments)


def cmd_experiments(args: argparse.Namespace) -> int:
    from .training.ablation import run_experiments

    result = run_experiments(
        args.data,
        args.out,
        args.gallery,
        args.epochs,
        args.cache,
        args.seed,
        args.only,
        progress=not args.quiet,
        table=args.table,
    )
    print(result["table"])
    return 0


def query_bench_parser(sub: Subcommands) -> None:
    """`query-bench`'s options."""
    parser = sub.add_parser(
        "query-bench",
        parents=[SHIPPED, GALLERY, SEED, JSON, OUT],
        help="short typed queries: attribute precision@10 against the gallery",
    )
    parser.add_argument("--set", default="default", choices=["default", "check"], help="which phrasings")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--probe", action="store_true", help="also: which attributes the embeddings carry")
    parser.add_argument(
        "--no-details", action="store_true", help="rank by the embeddings' cosine alone (no detail score)"
    )
    parser.add_argument(
        "--as-typed", action="store_true", help="the model reads the queries as typed (default: as the app reads them)"
    )
    parser.set_defaults(func=cmd_query_bench)


def cmd_query_bench(args: argparse.Namespace) -> int:
    from .eval.querybench import format_query_bench, run_query_bench

    result = run_query_bench(
        args.checkpoint,
        args.gallery,
        args.set,
        args.count,
        args.seed,
        args.probe,
        not args.no_details,
        not args.as_typed,
    )
    print(json.dumps(result, indent=2) if args.json else format_query_bench(result))
    _write_json(result, args.out)
    return 0


def photo_domain_parser(sub: Subcommands) -> None:
    """`photo-domain`'s options."""
    parser = sub.add_parser(
        "photo-domain",
        parents=[SHIPPED, SEED, QUIET],
        help="fit which photos are like the training world (the app warns for the others); beside the checkpoint",
    )
    parser.add_argument("--data", required=True, help="the dataset the checkpoint was trained on")
    parser.add_argument("--images", type=int, default=3000, help="training images the Gaussian is fitted on")
    parser.set_defaults(func=cmd_photo_domain)


def cmd_photo_domain(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .data.dataset import normalize
    from .data.readers import read_dataset
    from .files import read_image
    from .model.checkpoint import checkpoint_fingerprint, load_checkpoint
    from .search.domain import VAL_FLAGGED, domain_path, fit_domain, pooled_tokens
    from .training.sampling import split_records

    model, card = load_checkpoint(args.checkpoint)
    model.eval()
    splits = split_records(read_dataset(args.data)[0], args.seed)
    size = model.config.image.img_size

    def features(records: list) -> np.ndarray:
        paths = list(dict.fromkeys(r.image_path for r in records))
        chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
        return np.concatenate(
            [
                pooled_tokens(model, normalize(torch.from_numpy(np.stack([read_image(p, size) for p in c]))))
                for c in chunks
            ]
        )

    rng = np.random.default_rng(args.seed)
    train = splits["train"]
    picked = [train[i] for i in sorted(rng.choice(len(train), min(args.images, len(train)), replace=False))]
    domain = fit_domain(features(picked), features(splits["val"]), checkpoint_fingerprint(card))
    out = domain_path(args.checkpoint)
    domain.save(out)
    print(f"{out}: threshold {domain.threshold:.1f} ({VAL_FLAGGED:.0%} of val images beyond it)")
    return 0


COMMANDS = [
    bench_parser,
    train_parser,
    lineage_parser,
    evaluate_parser,
    train_details_parser,
    fit_foreground_parser,
    export_parser,
    index_parser,
    search_parser,
    ablation_parser,
    experiments_parser,
    explain_quality_parser,
    query_bench_parser,
    synth_parser,
    gallery_parser,
    contact_sheet_parser,
    ambiguity_parser,
    lexical_probe_parser,
    space_parser,
    photo_domain_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lgur", description="LGUR Explorer: text-based person search")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
