"""The `vqa-search` command line: parses arguments, calls the library, prints the result.

User mistakes (bad paths, missing index, offline weights) print one line on stderr and exit with 2.

Start-up is part of the interface: this module imports no torch, open_clip or FAISS (tests/test_startup.py
checks it), so `--help`, `--version` and the commands that need no model answer at once. Defaults shown
in the help come from light modules (core/identity.py, core/threads.py, align/constants.py,
vqa/constants.py, vqa/answers.py); each command imports the library it calls when it runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from vqa_search import __version__
from vqa_search.align.constants import DEFAULT_REGIONS, DEFAULT_TOP
from vqa_search.core.atomic import write_json, write_json_lines, write_text
from vqa_search.core.errors import NOT_WRITABLE, OUT_OF_SPACE, UserError
from vqa_search.core.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED
from vqa_search.core.ray_runner import choose_runner
from vqa_search.core.threads import MAX_WORKERS, plan_threads, threads_from_environment, torch_threads
from vqa_search.vqa.answers import DEFAULT_VOCAB_SIZE
from vqa_search.vqa.constants import DEFAULT_LOCAL_MODEL, DEFAULT_LOCAL_PRETRAINED, DEFAULT_TOP_ANSWERS

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # inherited by every command and group

WORKERS_HELP = (f"Decoding processes. Default: one core fewer than this process may use (at most {MAX_WORKERS}), "
                "so that they and --threads never exceed the cores.")
THREADS_HELP = "Torch threads. Default: OMP_NUM_THREADS if set, else the cores the decoding processes leave."
RUNNER_HELP = ("local | ray: decode and encode on a Ray cluster (pip install 'vqa-search[ray]'); shards are "
               "written and committed here either way.")
RAY_ADDRESS_HELP = "Ray cluster to join (e.g. auto, or ray://head:10001). Default: RAY_ADDRESS, else start Ray here."
ACTORS_HELP = "Ray actors running the model (each loads it once). Default: one per GPU share, else one per CPU."
GPUS_PER_ACTOR_HELP = "GPUs per Ray actor (e.g. 1, or 0.5 to share one). Default: 0 (CPU)."

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP_OPTIONS,
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"vqa-search {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Search photo collections by meaning: CLIP embeddings in FAISS, from the command line.

    \b
    Examples:
      vqa-search index ./flickr8k                     # embed a folder of images and its captions
      cd flickr8k && vqa-search query "dog on beach"  # the index is found from here upwards
      vqa-search info ./flickr8k                      # what the index holds, without loading a model
      vqa-search make-shapes ./shapes                 # an offline dataset to try everything on
      vqa-search index ./shapes --model vqa-tiny --pretrained none

    Every command has --help (-h) with examples. Mistakes print one line starting with "error:" and
    exit with code 2.
    """


def _user_errors(command):
    """One clear line instead of a traceback for anything the user can fix."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except OSError as error:  # a full, read-only or forbidden place that no writer or reader described
            if error.errno not in OUT_OF_SPACE and error.errno not in NOT_WRITABLE:
                raise
            typer.echo(f"error: {os.strerror(error.errno).lower()}: {error.filename or 'a file'}", err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _given(ctx: typer.Context, parameter: str) -> bool:
    """Whether `parameter` was on the command line, not left at its default."""
    source = ctx.get_parameter_source(parameter)
    return source is not None and source.name == "COMMANDLINE"  # by name: newer typer vendors its own click


def _model_threads(command):
    """For a command that runs a model: its --threads and --workers sized together (core/threads.py),
    torch held to those threads while it runs. The command receives both as numbers."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        threads = kwargs["threads"]
        plan = plan_threads(threads if threads is not None else threads_from_environment(), kwargs.get("workers", 0))
        kwargs["threads"] = plan.threads
        if "workers" in kwargs:
            kwargs["workers"] = plan.workers
        with torch_threads(plan.threads):
            return command(*args, **kwargs)

    return wrapper


def _setup_logging(quiet: bool = False) -> None:
    # open_clip warns on the root logger about random weights; our own warnings are what users need.
    logging.getLogger().setLevel(logging.ERROR)
    ours = logging.getLogger("vqa_search")
    ours.propagate = False
    ours.setLevel(logging.ERROR if quiet else logging.INFO)
    for previous in list(ours.handlers):  # bound to the stderr of an earlier call (tests run many)
        ours.removeHandler(previous)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
    handler.addFilter(_lowercase_level)
    ours.addHandler(handler)


def _lowercase_level(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


def _print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@app.command()
@_user_errors
@_model_threads
def index(
    dataset: Path = typer.Argument(..., help="Folder of images, e.g. a Flickr8k download (captions found automatically)."),
    out: Optional[Path] = typer.Option(None, help="Index directory. Default: DATASET/.vqa-search"),
    model: Optional[str] = typer.Option(
        None, help=f"open_clip model name. Default: the index's, else {DEFAULT_MODEL}."),
    pretrained: Optional[str] = typer.Option(
        None, help=f"open_clip pretrained tag, a checkpoint file, or 'none'. Default: the index's, else "
                   f"{DEFAULT_PRETRAINED}."),
    reembed: bool = typer.Option(
        False, "--reembed", help="Allow other --model/--pretrained than the index's: embeds everything again."),
    captions: Optional[Path] = typer.Option(None, help="Caption file (captions.txt, Flickr8k.token.txt, dataset_*.json)."),
    images: Optional[Path] = typer.Option(None, help="Images folder, when not DATASET/Images or DATASET itself."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    index_type: str = typer.Option("auto", help="auto | flat | ivf | ivfpq | ivfpq-ondisk (auto: exact search up to "
                                   "50,000 vectors, IVF-PQ with on-disk lists above 2,000,000)."),
    max_index_memory: Optional[str] = typer.Option(
        None, help="Memory budget of the index, e.g. 4G: chooses its type, nlist, PQ bytes and (measured) nprobe; "
                   "`info` shows the choice and its recall."),
    backend: Optional[str] = typer.Option(
        None, help="auto | torch | onnx: what runs the model (onnx: ONNX Runtime on a cached export of the same "
                   "weights). Default: what the index's last run asked for, else auto."),
    precision: Optional[str] = typer.Option(
        None, help="auto | fp32 | fp16 | bf16 | int8 (fp16: CUDA only; int8: CPU only). auto: PyTorch fp32 on "
                   "the CPU, fp16 on CUDA (README: Backends and precisions). Queries use "
                   "the index's choice."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or warnings; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    runner_name: str = typer.Option("local", "--runner", help=RUNNER_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    actors: Optional[int] = typer.Option(None, help=ACTORS_HELP),
    gpus_per_actor: Optional[float] = typer.Option(None, help=GPUS_PER_ACTOR_HELP),
) -> None:
    """Embed a folder of images (or webdataset .tar shards) and its captions; run again to update it incrementally.

    \b
    Examples:
      vqa-search index ./flickr8k
      vqa-search index ~/Pictures --out ~/pictures-index --batch-size 32
      vqa-search index ./laion-shards --runner ray --ray-address auto --gpus-per-actor 1
      vqa-search index ~/archive --max-index-memory 4G   # IVF-PQ on disk when the vectors do not fit
      vqa-search index ./flickr8k --backend torch --precision fp32   # the PyTorch reference
    """
    from vqa_search.indexer.build import BuildConfig, build_index

    _setup_logging(quiet)
    config = BuildConfig(
        model=model, pretrained=pretrained, out=out, captions=captions, images=images, batch_size=batch_size,
        workers=workers, index_type=index_type, progress=not quiet,
        reembed=reembed, max_index_memory=max_index_memory, backend=backend, precision=precision,
        runner=choose_runner(runner_name, ray_address, actors, gpus_per_actor),
    )
    report = build_index(dataset, config)
    if as_json:
        _print_json(report.to_json())
    else:
        typer.echo(report.summary(), err=True)


@app.command()
@_user_errors
@_model_threads
def query(
    text: Optional[str] = typer.Argument(None, help="What to look for, e.g. \"dog on beach\"."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index directory. Default: found from here upwards."),
    k: int = typer.Option(10, "-k", "--k", help="Number of results."),
    image: Optional[Path] = typer.Option(None, help="Query with an image instead of text."),
    target: str = typer.Option("images", help="images | captions: what to return."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists to visit (default: the index's own)."),
    model: Optional[str] = typer.Option(None, help="Refuse unless the index was built with this model."),
    pretrained: Optional[str] = typer.Option(None, help="Refuse unless the index was built with these weights."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    sheet: Optional[Path] = typer.Option(None, help="Also draw a contact sheet of the results (PNG/JPG)."),
    rerank: bool = typer.Option(False, "--rerank", help="Re-score the top results with the stage-2 re-ranker."),
    reranker: Optional[Path] = typer.Option(None, help="Re-ranker file (implies --rerank). Default: INDEX/reranker.safetensors"),
    rerank_top: int = typer.Option(DEFAULT_TOP, help="How many global results the re-ranker re-scores."),
    explain: bool = typer.Option(False, "--explain", help="With --rerank: each word's most attended region."),
    threads: Optional[int] = typer.Option(None, help="Torch threads. Default: OMP_NUM_THREADS if set, else one per core."),
) -> None:
    """Find images (or captions) by text or by example image.

    \b
    Examples:
      vqa-search query "dog on beach" -k 5
      vqa-search query --image holiday.jpg --target captions --json
      vqa-search query "two children, one on a bike" --rerank --explain --sheet hits.png
    """
    from vqa_search.retrieval.render import results_table, write_result_sheet
    from vqa_search.retrieval.searcher import Index

    _setup_logging()
    rerank = rerank or reranker is not None
    if explain and not rerank:
        raise UserError("--explain shows what the re-ranker attended to: add --rerank")
    searcher = Index.open(index_dir, model=model, pretrained=pretrained)
    if rerank:
        from vqa_search.align.rerank import QueryReranker

        result = QueryReranker(searcher, reranker, rerank_top).search(text=text, image=image, k=k, target=target,
                                                                     nprobe=nprobe, explain=explain)
    else:
        result = searcher.search(text=text, image=image, k=k, target=target, nprobe=nprobe)
    if sheet:
        write_result_sheet(searcher, result, sheet)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(results_table(result))


@app.command()
@_user_errors
@_model_threads
def ask(
    image: Path = typer.Argument(..., help="The picture the question is about."),
    question: str = typer.Argument(..., help="e.g. \"what color is the dog's collar?\""),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index for caption evidence and a regions head's region set. Default: found from here upwards (optional with --head); a regions head reads the index it was trained on."),
    head: Optional[Path] = typer.Option(None, help="Answer head from `train vqa` (.safetensors)."),
    top: int = typer.Option(DEFAULT_TOP_ANSWERS, help="How many of the head's answers to show."),
    as_json: bool = typer.Option(False, "--json", help="Print both answers, with scores, as JSON."),
    threads: Optional[int] = typer.Option(None, help="Torch threads. Default: OMP_NUM_THREADS if set, else one per core."),
) -> None:
    """Answer a question about an image: a trained head's answers and the index's caption evidence.

    \b
    Examples:
      vqa-search ask photo.jpg "how many people are on the bench?" --head vqa-head.safetensors
      vqa-search ask shapes/Images/shape_000123.png "what color is the star?" --index shapes --json
    """
    from vqa_search.vqa.ask import ask as answer

    _setup_logging()
    result = answer(image, question, index_dir=index_dir, head=head, top=top)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.text())


@app.command()
@_user_errors
def export(
    index_dir: Path = typer.Argument(..., metavar="DIR", help="Index directory (or the dataset folder holding it)."),
    out: Path = typer.Option(..., help="Output file: .npz or .parquet"),
) -> None:
    """Write an index's vectors and metadata to one .npz or .parquet file.

    \b
    Example:
      vqa-search export ./flickr8k --out flickr8k-vectors.parquet
    """
    from vqa_search.retrieval.export import export_vectors
    from vqa_search.retrieval.searcher import Index

    written = export_vectors(Index.open(index_dir), out)
    typer.echo(f"wrote {written}", err=True)


@app.command()
@_user_errors
def info(
    index_dir: Optional[Path] = typer.Argument(
        None, metavar="INDEX", help="Index directory, or the dataset folder holding it. Default: found from here upwards."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON (every skipped file too)."),
) -> None:
    """What an index holds: model and weights, counts, disk use, generations, skipped files, region sets
    and the re-ranker. Loads no model, so it answers at once.

    \b
    Examples:
      vqa-search info ./flickr8k
      cd flickr8k && vqa-search info --json
    """
    from vqa_search.align.info import index_info

    described = index_info(index_dir)
    if as_json:
        _print_json(described.to_json())
    else:
        typer.echo(described.text())


@app.command()
@_user_errors
@_model_threads
def serve(
    index_dirs: Optional[list[Path]] = typer.Option(
        None, "--index", help="An index (or the dataset folder holding it), or a folder of them; repeatable. "
                              "Default: found from here upwards."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback needs --token."),
    port: int = typer.Option(8000, help="Port to listen on."),
    reranker: Optional[Path] = typer.Option(None, help="Re-ranker for rerank=true. Default: INDEX/reranker.safetensors"),
    head: Optional[Path] = typer.Option(None, help="Answer head from `train vqa` for questions (.safetensors)."),
    token: Optional[str] = typer.Option(None, envvar="VQA_SEARCH_TOKEN", show_envvar=True,
                                        help="Bearer token every API request must carry (the page asks for it)."),
    cors: Optional[list[str]] = typer.Option(None, help="Allow this web origin to call the API; repeatable. Default: none."),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
) -> None:
    """Serve the search, questions and pictures over HTTP, with a web page at /; the model stays loaded
    and a new generation from `vqa-search index` is picked up by the next request.

    \b
    Examples:
      vqa-search serve --index ./shapes                 # then open http://127.0.0.1:8000/
      vqa-search serve --index ./indexes --port 8080    # every index in the folder, chosen per request
      VQA_SEARCH_TOKEN=s3cret vqa-search serve --host 0.0.0.0 --head vqa-head.safetensors
    """
    from vqa_search.serve.run import serve_forever

    _setup_logging()
    serve_forever(index_dirs or [], host=host, port=port, reranker=reranker, head=head, token=token,
                  cors=cors or [], echo=lambda line: typer.echo(line, err=True))


@app.command("make-shapes")
@_user_errors
def make_shapes(
    out: Path = typer.Argument(..., help="New (or empty) folder for the dataset."),
    images: int = typer.Option(4000, help="Number of images."),
    seed: int = typer.Option(0, help="Same seed, same files."),
    size: int = typer.Option(96, help="Image side in pixels."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; the summary stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Generate the shapes world: captioned images with near misses, VQA questions and boxes.

    It is laid out like Flickr8k, so `index`, `query` and `bench recall` take it as it is.

    \b
    Examples:
      vqa-search make-shapes ./shapes
      vqa-search make-shapes ./shapes-small --images 500 --seed 1 --size 64
    """
    from vqa_search.shapes import ShapesConfig, make_shapes as generate

    summary = generate(out, ShapesConfig(images=images, seed=seed, size=size), progress=not quiet)
    if as_json:
        _print_json({**asdict(summary), "out": str(summary.out)})
    else:
        baseline = ", ".join(f"{kind} {percent:.0f}%" for kind, percent in summary.majority_baseline.items())
        typer.echo(
            f"wrote {summary.images} images, {summary.captions} captions and {summary.questions} questions "
            f"to {summary.out} in {summary.seconds:.1f} s\nmajority-answer baseline on test: {baseline}",
            err=True,
        )


@app.command()
@_user_errors
@_model_threads
def regions(
    dataset: Path = typer.Argument(..., help="Indexed dataset folder (or its index directory)."),
    source: str = typer.Option(
        "detector", help="detector | clip-patches (the index's CLIP ViT patches: cheaper) | clip-crops (each box "
        "cropped and embedded by the index's CLIP; without --boxes the whole image and a grid)."),
    boxes: Optional[Path] = typer.Option(
        None, "--boxes", help="COCO-format boxes file (e.g. the shapes world's boxes.json): each image's given boxes "
        "first, in file order, instead of detections; then the whole image and the grid up to K."),
    detector: Optional[str] = typer.Option(None, help="frcnn-r50 | frcnn-mobilenet. Default: R50 on GPU, MobileNet on CPU."),
    detector_weights: Optional[Path] = typer.Option(None, help="Detector state dict (.pth or .safetensors). Default: torchvision's cache."),
    num_regions: Optional[int] = typer.Option(
        None, "--regions", help=f"Regions per image (default {DEFAULT_REGIONS}; clip-patches: one per patch)."),
    proposals: Optional[int] = typer.Option(
        None, help="Detector: RPN proposals kept per image (default the detector's own, 1000). Fewer is faster "
        "on a CPU; keep it well above --regions."),
    batch_size: int = typer.Option(8, help="Images per batch."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    runner_name: str = typer.Option("local", "--runner", help=RUNNER_HELP),
    ray_address: Optional[str] = typer.Option(None, help=RAY_ADDRESS_HELP),
    actors: Optional[int] = typer.Option(None, help=ACTORS_HELP),
    gpus_per_actor: Optional[float] = typer.Option(None, help=GPUS_PER_ACTOR_HELP),
) -> None:
    """Compute K region features per indexed image for the stage-2 re-ranker; run again to update.

    \b
    Examples:
      vqa-search regions ./flickr8k --detector frcnn-mobilenet
      vqa-search regions ./shapes --source clip-patches
      vqa-search regions ./shapes --boxes ./shapes/boxes.json --source clip-crops
      vqa-search regions ./shapes --detector-weights shapes-det.safetensors --proposals 100
      vqa-search regions ./flickr8k --source clip-patches --runner ray --ray-address auto
    """
    from vqa_search.align.region_store import compute_regions
    from vqa_search.align.regions import RegionConfig

    _setup_logging(quiet)
    config = RegionConfig(
        source=source, detector=detector, detector_weights=detector_weights, regions=num_regions, proposals=proposals,
        batch_size=batch_size, workers=workers, progress=not quiet, boxes=boxes,
        runner=choose_runner(runner_name, ray_address, actors, gpus_per_actor),
    )
    report = compute_regions(dataset, config)
    if as_json:
        _print_json(report.to_json())
    else:
        typer.echo(report.summary(), err=True)


bench_app = typer.Typer(help="""Benchmarks: recall@K on the Karpathy protocol, VQA accuracy, and reports of several runs.

\b
Examples:
  vqa-search bench recall ./flickr8k --split test --append results.jsonl
  vqa-search bench report results.jsonl --out table.md --plot curves.png
  vqa-search bench vqa ./shapes --head head.safetensors --split test --mode both
""", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")


@bench_app.command()
@_user_errors
@_model_threads
def recall(
    dataset: Path = typer.Argument(..., help="Dataset folder with split information (Karpathy json or split files)."),
    split: str = typer.Option("test", help="train | val | test"),
    model: str = typer.Option(DEFAULT_MODEL, help="open_clip model name."),
    pretrained: str = typer.Option(DEFAULT_PRETRAINED, help="open_clip pretrained tag, a checkpoint file, or 'none'."),
    index_type: str = typer.Option("flat", help="flat (exact) | ivf | ivfpq: what an ANN index costs in recall."),
    nprobe: Optional[int] = typer.Option(None, help="IVF lists to visit (default: the index type's own)."),
    k: str = typer.Option("1,5,10", "--k", help="Comma-separated K values."),
    name: Optional[str] = typer.Option(None, help="Row label in reports. Default: 'MODEL PRETRAINED'."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index whose embeddings to reuse. Default: DATASET/.vqa-search"),
    captions: Optional[Path] = typer.Option(None, help="Caption file, when not found automatically."),
    images: Optional[Path] = typer.Option(None, help="Images folder, when not found automatically."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-': stdout)."),
    append: Optional[Path] = typer.Option(None, help="Add the run to this results file (JSON lines) for `bench report`."),
    save_ranks: Optional[Path] = typer.Option(None, help="Write one JSON line per query with its rank."),
    plot: Optional[Path] = typer.Option(None, help="Draw recall@K curves, K = 1..50 (PNG)."),
    reranker: Optional[Path] = typer.Option(None, help="Also a row with this stage-2 re-ranker on the same gallery."),
    rerank_top: int = typer.Option(DEFAULT_TOP, help="With --reranker: global candidates re-ranked per query."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; the table stays."),
) -> None:
    """Recall@K both ways on a split: the standard (Karpathy) protocol.

    \b
    Examples:
      vqa-search bench recall ./flickr8k --split test --json recall.json
      vqa-search bench recall ./shapes --model vqa-tiny --pretrained none --append results.jsonl
      vqa-search bench recall ./flickr8k --pretrained ft.safetensors --reranker flickr8k/.vqa-search/reranker.safetensors
    """
    from vqa_search.retrieval.recall import RecallConfig, run_recall
    from vqa_search.retrieval.recall_report import append_run, plot_curves, text_table

    _setup_logging(quiet)
    config = RecallConfig(
        split=split, model=model, pretrained=pretrained, index_type=index_type, nprobe=nprobe, ks=_parse_ks(k),
        name=name, index=index_dir, captions=captions, images=images, batch_size=batch_size,
        workers=workers, progress=not quiet,
    )
    runs = [run_recall(dataset, config)]
    if reranker:
        from vqa_search.core.store import DEFAULT_DIR_NAME
        from vqa_search.align.rerank import reranked_run

        runs.append(reranked_run(runs[0], reranker, index_dir or dataset / DEFAULT_DIR_NAME, rerank_top))
    results = [run.to_json() for run in runs]
    if save_ranks:
        write_json_lines(save_ranks, ({**record, "run": run.name} for run in runs for record in run.rank_records()))
    if append:
        for result in results:
            append_run(append, result)
    if plot:
        plot_curves(results, plot)
    if json_out == Path("-"):
        _print_json(results[0] if len(results) == 1 else results)
        return
    if json_out:
        write_json(json_out, results[0] if len(results) == 1 else results)
    typer.echo("\n\n".join(text_table(result) for result in results))


@bench_app.command()
@_user_errors
def report(
    results: Path = typer.Argument(..., help="Results file written by `bench recall --append` (and `bench compositional --append`)."),
    out: Optional[Path] = typer.Option(None, help="Write the markdown table here (default: print it)."),
    plot: Optional[Path] = typer.Option(None, help="Draw all runs' recall@K curves in one PNG."),
) -> None:
    """Several recall runs in one markdown table (with chance rows) and one plot; compositional runs in their own table.

    \b
    Example:
      vqa-search bench report results.jsonl --out table.md --plot curves.png
    """
    from vqa_search.retrieval.compositional import is_compositional, markdown_table as compositional_table
    from vqa_search.retrieval.recall_report import markdown_table, plot_curves, read_runs

    runs = read_runs(results)
    recall_runs = [run for run in runs if not is_compositional(run)]
    compositional = [run for run in runs if is_compositional(run)]
    table = "\n".join(([markdown_table(recall_runs)] if recall_runs else [])
                      + ([compositional_table(compositional)] if compositional else []))
    if plot:
        if not recall_runs:
            raise UserError(f"{results} holds no recall runs to plot")
        plot_curves(recall_runs, plot)
    if out:
        write_text(out, table)
    else:
        typer.echo(table, nl=False)


@bench_app.command("vqa")
@_user_errors
@_model_threads
def bench_vqa(
    data: Path = typer.Argument(..., help="VQA data: a vqa.jsonl file or folder, or a VQA v2 folder (questions + annotations)."),
    head: Optional[Path] = typer.Option(None, help="Answer head from `train vqa` (modes head and both)."),
    split: str = typer.Option("val", help="train | val | test"),
    mode: str = typer.Option("head", help="head | captions | both (captions: answers read from the index's captions)."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index for captions mode (default: DATA/.vqa-search) and a regions head's region set (default: the head's own index)."),
    images: Optional[Path] = typer.Option(None, help="Images folder, when image paths are not relative to DATA."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-': stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; the table stays."),
) -> None:
    """Official VQA accuracy overall and by question type, exact match, and the majority-answer baseline.

    \b
    Examples:
      vqa-search bench vqa ./shapes --head shapes-head.safetensors --split test --mode both
      vqa-search bench vqa ./vqa2 --head vqa2-head.safetensors --images ./coco --json vqa.json
    """
    from vqa_search.vqa.bench import VqaBenchConfig, accuracy_table, run_vqa_bench

    _setup_logging(quiet)
    config = VqaBenchConfig(head=head, split=split, mode=mode, index=index_dir, images=images, batch_size=batch_size,
                            workers=workers, progress=not quiet)
    results = run_vqa_bench(data, config)
    if json_out == Path("-"):
        _print_json(results)
        return
    if json_out:
        write_json(json_out, results)
    typer.echo(accuracy_table(results))


@bench_app.command("compositional")
@_user_errors
@_model_threads
def bench_compositional(
    data: Path = typer.Argument(..., help="A folder of SugarCrepe files (swap_att.json, ...), one such file, "
                                          "or a Winoground file (.jsonl, or .json holding a list)."),
    images: Optional[Path] = typer.Option(None, help="Folder the image names are relative to. Default: the "
                                                     "SugarCrepe folder's parent, or the Winoground file's folder."),
    model: Optional[str] = typer.Option(None, help=f"open_clip model name. Default: the index's, else {DEFAULT_MODEL}."),
    pretrained: Optional[str] = typer.Option(
        None, help=f"open_clip pretrained tag, a checkpoint file, or 'none'. Default: the index's, else {DEFAULT_PRETRAINED}."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index (or its dataset folder) whose regions "
                                                                   "--reranker reads. Default: the images folder."),
    reranker: Optional[Path] = typer.Option(None, help="Also a row with this stage-2 re-ranker: s = s_global + λ·s_fine."),
    name: Optional[str] = typer.Option(None, help="Row label in reports. Default: 'MODEL PRETRAINED'."),
    batch_size: int = typer.Option(64, help="Images per forward pass."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-': stdout)."),
    append: Optional[Path] = typer.Option(None, help="Add the run(s) to this results file (JSON lines) for `bench report`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; the table stays."),
) -> None:
    """Compositional captions: SugarCrepe accuracy per category, Winoground text / image / group scores.

    SugarCrepe: share of images whose true caption scores above its hard negative (chance 50 %).
    Winoground: text, image and group scores of caption/image pairs (chance 25, 25, 16.7 %).
    `make-shapes` writes both for its test split: DATASET/sugarcrepe/ and DATASET/winoground.jsonl.

    \b
    Examples:
      vqa-search bench compositional ./shapes/sugarcrepe --append results.jsonl
      vqa-search bench compositional ./shapes/winoground.jsonl --reranker ./shapes/.vqa-search/reranker.safetensors
      vqa-search bench compositional ./sugarcrepe/data --images ./coco/val2017 --json -
    """
    from vqa_search.align.compositional import CompositionalConfig, run_compositional
    from vqa_search.retrieval.compositional import text_table as compositional_text
    from vqa_search.retrieval.recall_report import append_run

    _setup_logging(quiet)
    config = CompositionalConfig(model=model, pretrained=pretrained, images=images, index=index_dir, reranker=reranker,
                                 name=name, batch_size=batch_size, workers=workers, progress=not quiet)
    results = run_compositional(data, config)
    if append:
        for result in results:
            append_run(append, result)
    if json_out == Path("-"):
        _print_json(results[0] if len(results) == 1 else results)
        return
    if json_out:
        write_json(json_out, results[0] if len(results) == 1 else results)
    typer.echo("\n".join(compositional_text(result) for result in results))


CACHE_HELP = ("Frozen features: memory | disk (.npy files, memory-mapped, reused by the next run) | auto "
              "(a stored cache if one matches, else disk above half the available memory).")
CACHE_DIR_HELP = "Where --cache disk writes. Default: DATASET/.vqa-search/feature-cache"

train_app = typer.Typer(help="""Adapt CLIP to a collection (stage-1 fine-tuning, the stage-2 re-ranker) and train VQA answer heads.

\b
Examples:
  vqa-search train finetune ./flickr8k --out ft.safetensors --unfreeze-last 2
  vqa-search train rerank ./flickr8k --pretrained ft.safetensors --lambda auto
  vqa-search train vqa ./shapes --out head.safetensors --variant baseline --model vqa-tiny --pretrained none
  vqa-search train detector ./shapes --boxes ./shapes/boxes.json --out det.safetensors
""", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(train_app, name="train")


@train_app.command()
@_user_errors
@_model_threads
def finetune(
    dataset: Path = typer.Argument(..., help="Dataset folder with train and val splits and captions."),
    out: Path = typer.Option(..., help="Checkpoint to write (.safetensors); the history JSON and curve PNG go beside it."),
    model: str = typer.Option(DEFAULT_MODEL, help="open_clip model name."),
    pretrained: str = typer.Option(DEFAULT_PRETRAINED, help="Starting weights: tag, checkpoint file, or 'none' (scratch)."),
    epochs: int = typer.Option(12, help="Most epochs to train."),
    batch_size: int = typer.Option(64, help="Image-caption pairs per step: the in-batch negatives."),
    lr: float = typer.Option(1e-5, help="Peak learning rate (AdamW, warm-up then cosine decay)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay, on weights of 2 or more dimensions."),
    temperature: float = typer.Option(0.07, help="Starting softmax temperature (learned unless --fixed-temperature)."),
    fixed_temperature: bool = typer.Option(False, "--fixed-temperature", help="Keep the temperature fixed."),
    seed: int = typer.Option(42, help="Same seed, same run."),
    unfreeze_last: int = typer.Option(0, help="Train only the last N blocks of each tower (CPU preset); 0: all."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better val recall."),
    cache: str = typer.Option("auto", help="--unfreeze-last: " + CACHE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, help=CACHE_DIR_HELP),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Stage 1: contrastive fine-tuning on the train split, keeping the epoch with the best val recall.

    \b
    Examples:
      vqa-search train finetune ./flickr8k --out flickr8k-ft.safetensors --unfreeze-last 2
      vqa-search train finetune ./shapes --out shapes.safetensors --model vqa-tiny --pretrained none --lr 1e-3 --epochs 20
      vqa-search train finetune ./coco --out coco-ft.safetensors --unfreeze-last 2 --cache disk --cache-dir /scratch/cache
    """
    from vqa_search.align.finetune import FinetuneConfig, finetune as train

    _setup_logging(quiet)
    config = FinetuneConfig(
        model=model, pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        temperature=temperature, learn_temperature=not fixed_temperature, seed=seed, unfreeze_last=unfreeze_last,
        patience=patience, workers=workers, cache=cache, cache_dir=cache_dir,
    )
    result = train(dataset, out, config, progress=not quiet)
    if as_json:
        _print_json(result.to_json())
    else:
        best = result.best
        typer.echo(
            f"kept epoch {result.best_epoch} of {len(result.history)} (val mean recall {best['mean_recall']:.1f}, "
            f"R@1 t2i {best['t2i']['R@1']:.1f} i2t {best['i2t']['R@1']:.1f}) in {result.checkpoint}; "
            f"curve {result.curve}, history {result.history_path}; {result.seconds:.0f} s",
            err=True,
        )


@train_app.command()
@_user_errors
@_model_threads
def rerank(
    ctx: typer.Context,
    dataset: Path = typer.Argument(..., help="Indexed dataset with train and val splits and computed regions."),
    pretrained: str = typer.Option(DEFAULT_PRETRAINED, help="The frozen CLIP's weights: tag, stage-1 checkpoint file, or 'none'."),
    old_pretrained: Optional[str] = typer.Option(None, "--checkpoint", hidden=True,
                                                 help="Deprecated name of --pretrained, for one release."),
    model: str = typer.Option(DEFAULT_MODEL, help="open_clip model name of those weights."),
    out: Optional[Path] = typer.Option(None, help="Re-ranker file. Default: INDEX/reranker.safetensors, used by `query --rerank`."),
    region_set: Optional[str] = typer.Option(
        None, "--region-set", help="Region set (frcnn-mobilenet, frcnn-r50, clip-patches). Default: the only one."),
    old_region_set: Optional[str] = typer.Option(None, "--regions", hidden=True,
                                                 help="Deprecated name of --region-set, for one release."),
    lam: str = typer.Option("1.0", "--lambda", help="λ in s = s_global + λ·s_fine, or 'auto' to choose it on val."),
    negatives: int = typer.Option(32, help="Hard negatives per caption, from the frozen CLIP's top ranks."),
    region_mlp: int = typer.Option(0, help="Hidden width of a small MLP on the regions; 0: LayerNorm only."),
    epochs: int = typer.Option(10, help="Most epochs to train."),
    batch_size: int = typer.Option(64, help="Captions per step (their images are in-batch negatives)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better val recall."),
    top: int = typer.Option(DEFAULT_TOP, "--rerank-top", help="Val: global candidates re-ranked per query."),
    seed: int = typer.Option(42, help="Same seed, same run."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Index directory. Default: DATASET/.vqa-search"),
    cache: str = typer.Option("auto", help="Train caption tokens and regions: " + CACHE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, help="Where --cache disk writes. Default: INDEX/feature-cache"),
    threads: Optional[int] = typer.Option(None, help="Torch threads. Default: OMP_NUM_THREADS if set, else one per core."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Stage 2: train the cross-attention re-ranker on a frozen CLIP and precomputed regions.

    \b
    Examples:
      vqa-search index ./flickr8k --pretrained flickr8k-ft.safetensors
      vqa-search regions ./flickr8k
      vqa-search train rerank ./flickr8k --pretrained flickr8k-ft.safetensors --lambda auto
      vqa-search train rerank ./shapes --model vqa-tiny --pretrained shapes.safetensors --region-set clip-patches
    """
    from vqa_search.align.train_rerank import RerankTrainConfig, train_reranker

    _setup_logging(quiet)
    if old_region_set is not None:
        if region_set is not None:
            raise UserError("--regions is the old name of --region-set: give only --region-set")
        typer.echo("warning: `train rerank --regions` is now --region-set (it names a set; `regions --regions` is "
                   "a count); the old name goes in the next release", err=True)
        region_set = old_region_set
    if old_pretrained is not None:
        if _given(ctx, "pretrained"):
            raise UserError("--checkpoint is the old name of --pretrained: give only --pretrained")
        typer.echo("warning: `train rerank --checkpoint` is now --pretrained (as in every other command); "
                   "the old name goes in the next release", err=True)
        pretrained = old_pretrained
    config = RerankTrainConfig(
        model=model, pretrained=pretrained, regions=region_set, out=out, index=index_dir, lam=_parse_lambda(lam),
        negatives=negatives, region_hidden=region_mlp, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, patience=patience, top=top, seed=seed, progress=not quiet, cache=cache,
        cache_dir=cache_dir,
    )
    result = train_reranker(dataset, config)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.summary(), err=True)


@train_app.command("vqa")
@_user_errors
@_model_threads
def train_vqa(
    data: Path = typer.Argument(..., help="VQA data with train and val splits: vqa.jsonl (file or folder) or a VQA v2 folder."),
    out: Path = typer.Option(..., help="Head file to write (.safetensors); the history JSON and curve PNG go beside it."),
    variant: str = typer.Option("dual-attention", help="baseline | dual-concat | dual-attention | regions (attention over a region set)."),
    model: str = typer.Option(DEFAULT_MODEL, help="CLIP for the global image and question embeddings."),
    pretrained: str = typer.Option(DEFAULT_PRETRAINED, help="Its weights: tag, stage-1 checkpoint, or 'none'."),
    local_model: str = typer.Option(DEFAULT_LOCAL_MODEL, help="Dual variants: the second, local-detail image encoder (a ViT): an open_clip name, or hf:NAME_OR_PATH for a Hugging Face ViT (hub id or save_pretrained folder)."),
    local_pretrained: str = typer.Option(DEFAULT_LOCAL_PRETRAINED, help="Its weights: tag, checkpoint file, or 'none' (an hf: model brings its own)."),
    unfreeze_last: int = typer.Option(0, help="Train the local encoder's last N blocks too; 0: frozen."),
    region_set: Optional[str] = typer.Option(
        None, "--region-set", help="Variant regions: the index's region set (from `vqa-search regions`). Default: the only one."),
    index_dir: Optional[Path] = typer.Option(None, "--index", help="Variant regions: the index holding the region set. Default: DATA/.vqa-search"),
    epochs: int = typer.Option(20, help="Most epochs to train."),
    batch_size: int = typer.Option(256, help="Questions per step (whole images)."),
    lr: float = typer.Option(1e-3, help="Peak learning rate of the head (AdamW, warm-up then cosine)."),
    local_lr: Optional[float] = typer.Option(None, help="Learning rate of the local encoder's blocks. Default: lr / 10."),
    weight_decay: float = typer.Option(1e-2, help="AdamW weight decay."),
    dropout: float = typer.Option(0.3, help="Dropout in the head's MLP."),
    loss: str = typer.Option("bce", help="bce (soft scores, the VQA v2 recipe) | ce (softmax over answers)."),
    vocab_size: int = typer.Option(DEFAULT_VOCAB_SIZE, help="Answers kept: the most frequent of the train split."),
    patience: int = typer.Option(4, help="Stop after this many epochs without a better val accuracy."),
    seed: int = typer.Option(42, help="Same seed, same run."),
    images: Optional[Path] = typer.Option(None, help="Images folder, when image paths are not relative to DATA."),
    cache: str = typer.Option("auto", help="Image vectors and local streams: " + CACHE_HELP),
    cache_dir: Optional[Path] = typer.Option(None, help="Where --cache disk writes. Default: DATA/.vqa-search/feature-cache"),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train an answer head on frozen CLIP features (and, optionally, the local encoder's last blocks).

    \b
    Examples:
      vqa-search train vqa ./vqa2 --images ./coco --out vqa2-head.safetensors --variant baseline
      vqa-search train vqa ./shapes --out shapes-head.safetensors --model vqa-tiny --pretrained stage1.safetensors \\
          --local-model vqa-tiny --local-pretrained stage1.safetensors --unfreeze-last 2
      vqa-search train vqa ./vqa2 --images ./coco --out vit-head.safetensors --local-model hf:google/vit-base-patch16-224
      vqa-search train vqa ./vqa2 --images ./coco --out b16-head.safetensors --cache disk --cache-dir /scratch/cache
      vqa-search regions ./shapes --source clip-crops --boxes ./shapes/boxes.json
      vqa-search train vqa ./shapes --out regions-head.safetensors --variant regions --region-set clip-crops-boxes
    """
    from vqa_search.vqa.train import VqaTrainConfig, train_vqa as train

    _setup_logging(quiet)
    config = VqaTrainConfig(
        variant=variant, model=model, pretrained=pretrained, local_model=local_model,
        local_pretrained=local_pretrained, unfreeze_last=unfreeze_last, regions=region_set, index=index_dir,
        epochs=epochs, batch_size=batch_size, lr=lr,
        local_lr=local_lr, weight_decay=weight_decay, dropout=dropout, loss=loss, vocab_size=vocab_size,
        patience=patience, seed=seed, images=images, workers=workers, cache=cache, cache_dir=cache_dir,
    )
    result = train(data, out, config, progress=not quiet)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.summary(), err=True)


@train_app.command("detector")
@_user_errors
@_model_threads
def train_detector_command(
    dataset: Path = typer.Argument(..., help="Dataset folder: its images and train/val splits (else 1 in 10 held out)."),
    boxes: Path = typer.Option(..., help="COCO-format boxes file (the shapes world's boxes.json, instances_*.json)."),
    out: Path = typer.Option(..., help="Detector file to write (.safetensors), for `regions --detector-weights`; "
                                       "the history JSON and curve PNG go beside it."),
    detector: str = typer.Option("frcnn-mobilenet", help="frcnn-mobilenet | frcnn-r50"),
    pretrained: str = typer.Option("none", help="none (from scratch) | coco (torchvision's COCO weights, cached)."),
    epochs: int = typer.Option(10, help="Most epochs to train."),
    batch_size: int = typer.Option(8, help="Images per step."),
    lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, warm-up then cosine decay)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    min_size: Optional[int] = typer.Option(None, help="Input shorter side in pixels. Default: from the data "
                                                      "(the median image's, 160..512)."),
    attributes: bool = typer.Option(True, "--attributes/--no-attributes",
                                    help="An attribute head on the box features when the file has attributes."),
    patience: int = typer.Option(3, help="Stop after this many epochs without a better val AP."),
    seed: int = typer.Option(42, help="Same seed, same run."),
    workers: Optional[int] = typer.Option(None, help=WORKERS_HELP),
    threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines; the result line stays."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Train a Faster R-CNN on COCO-format boxes, keeping the epoch with the best val COCO AP.

    \b
    Examples:
      vqa-search train detector ./shapes --boxes ./shapes/boxes.json --out shapes-det.safetensors --epochs 8
      vqa-search regions ./shapes --detector-weights shapes-det.safetensors
      vqa-search train detector ./mycoco --boxes instances_train.json --out det.safetensors --pretrained coco
    """
    from vqa_search.align.train_detector import DetectorTrainConfig, train_detector

    _setup_logging(quiet)
    config = DetectorTrainConfig(preset=detector, pretrained=pretrained, epochs=epochs, batch_size=batch_size, lr=lr,
                                 weight_decay=weight_decay, patience=patience, min_size=min_size,
                                 attributes=attributes, seed=seed, workers=workers)
    result = train_detector(dataset, boxes, out, config, progress=not quiet)
    if as_json:
        _print_json(result.to_json())
    else:
        typer.echo(result.summary(), err=True)


def _parse_lambda(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--lambda takes a number or 'auto' (got {text!r})") from None


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UserError(f"--k takes comma-separated integers such as 1,5,10 (got {text!r})") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
