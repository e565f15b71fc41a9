"""The one entry point: `python -m pipeline <command> --help`.

    build-default   build the embedded tiny base model and corpora (cached, rebuilt on recipe change)
    cache-teacher   stage one: teacher pass over the data into zstd Parquet shards + manifest
    merge-manifest  join the manifest parts of N stage-one workers (automatic when the last finishes)
    verify          check a cache's schema, counts and checksums; names any bad shard
    inspect         show one cached position: target and top-k with probabilities
    train           stage two: LoRA on the cached shards with the masked KL
    eval            learning (held-out target) vs forgetting (retention set, drift) of a run
    sweep           method x lambda x seed over one cache: results table and frontier plot
    approx-study    cached estimators' D_k vs the exact masked KL for k up to |V|-1; tail vs live
    demo            build-default -> cache-teacher -> train on the embedded default
    encoding-study  bytes/token vs D_k error of every cache encoding (BENCHMARKS.md "Cache encodings")
    bench           speed and memory, side by side: stage one, stage two, reader (runs/bench/)
    bench-step      one stage-two step per method: time and peak memory vs a CE-only step
    bench-teacher   stage-one engines' throughput vs plain prefill on random models
    bench-scaling   stage one with 1, 2, ... workers: tokens/s per worker count
    rank-rows       (under torchrun) which cache rows each DDP rank of stage two reads
    gpu-bench       on CUDA: stage one (Triton kernel) and stage two (fused) vs plain passes

Commands that take a config accept `--config FILE` and trailing `section.key=value` overrides.
Third-party logs (vLLM, transformers, datasets, torch) are held back unless `--verbose` is given,
before or after the command; errors always show.
"""
from __future__ import annotations

import argparse
import os
import sys

from pipeline.quiet import quiet_third_party

__all__ = ["main"]

DEFAULT_CONFIG = "configs/demo.yaml"
# Measurement tools with their own argparse `main(argv)`: `python -m pipeline NAME --help` is theirs.
TOOLS = {
    "bench-step": ("pipeline.bench.step", "one stage-two step per method: time and peak memory vs a CE-only step"),
    "bench-teacher": ("pipeline.bench.throughput", "stage-one engines' throughput vs plain prefill on random models"),
    "bench-scaling": ("pipeline.bench.scaling", "stage one with 1, 2, ... workers: tokens/s per worker count"),
    "rank-rows": ("pipeline.bench.rank_rows", "(under torchrun) which cache rows each DDP rank of stage two reads"),
    "gpu-bench": ("pipeline.bench.gpu", "on CUDA: stage one (Triton kernel) and stage two (fused) vs plain passes"),
    "bench-logging": ("pipeline.bench.logging_cost", "stage-two time per step with train.report_to tensorboard vs none"),
    "plot-run": ("pipeline.plot_run", "a run's CE and regularizer curves (PNG) drawn from its TensorBoard event file"),
}
VERBOSE = "--verbose"  # shows third-party logs (vLLM, transformers, datasets, torch); quiet without it
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. cache.k=64 train.reg_weight=0.5")


def _config(args):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


# --- commands ---------------------------------------------------------------------------------
def cmd_build_default(args) -> int:
    from pipeline.embedded import main_build_default

    main_build_default(args.out, force=args.force)
    return 0


def cmd_cache_teacher(args) -> int:
    config = _config(args)  # bad keys fail fast, before the heavy imports
    if args.launcher == "ray" or args.num_workers is not None or args.worker_rank is not None \
            or _scaled_out(config.cache.dir):
        from stages.scale_out.launch import run_scaled_stage_one

        print(run_scaled_stage_one(config, args.launcher, args.num_workers, args.worker_rank,
                                   args.ray_address, overwrite=args.overwrite))
        return 0
    from stages.cache_teacher import run_cache_teacher

    summary = run_cache_teacher(config, overwrite=args.overwrite)
    print(summary.render())
    return 0


def _scaled_out(cache_dir: str) -> bool:
    """A remote cache, or a Slurm array / torchrun worker: stage one runs as one of N workers."""
    from stages.scale_out.parts import resolve_worker
    from storage_schemas.remote import is_remote

    return is_remote(cache_dir) or resolve_worker().size > 1


def cmd_merge_manifest(args) -> int:
    from stages.scale_out.merge import merge_parts

    manifest = merge_parts(args.cache)
    print(f"OK   {args.cache}: merged {len(manifest.shards)} shards, {manifest.num_rows:,} examples, "
          f"{manifest.num_tokens:,} tokens (complete={manifest.complete}); run `verify` to check checksums")
    return 0


def cmd_verify(args) -> int:
    from storage_schemas import Manifest
    from storage_schemas.remote import local_cache_copy
    from storage_schemas.shard_io import verify_cache

    cache = local_cache_copy(args.cache, args.local_dir)  # a remote cache is downloaded first
    manifest = Manifest.load(cache)
    problems = verify_cache(cache, manifest)
    for problem in problems:
        print(f"BAD  {problem}", file=sys.stderr)
    if not problems:
        print(f"OK   {args.cache}: {len(manifest.shards)} shards, {manifest.num_rows:,} examples, "
              f"{manifest.num_tokens:,} tokens, checksums verified")
    return 1 if problems else 0


def cmd_inspect(args) -> int:
    from pipeline.inspect_cache import describe_position

    print(describe_position(args.cache, args.example, args.position, args.model, args.top))
    return 0


def cmd_train(args) -> int:
    config = _config(args)
    from stages.train import run_train

    if args.allow_model_mismatch:
        config.train.allow_model_mismatch = True
    run_train(config, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from pipeline.config import config_for_run
    from stages.evaluate import run_eval

    config = config_for_run(args.run, args.overrides) if args.run else _config(args)
    run_eval(config, args.run)
    return 0


def cmd_sweep(args) -> int:
    config = _config(args)
    from pipeline.studies.sweep import run_sweep

    run_sweep(config)
    return 0


def cmd_approx_study(args) -> int:
    config = _config(args)
    from pipeline.studies.approx_study import run_approx_study

    run_approx_study(config)
    return 0


def cmd_demo(args) -> int:
    config = _config(args)
    from pipeline.embedded import main_build_default
    from stages.cache_teacher import run_cache_teacher
    from stages.train import run_train

    main_build_default(args.out, force=False)
    print(run_cache_teacher(config).render())  # a finished cache is reused, a killed one resumed
    run_train(config, resume=True)  # likewise: re-running the demo continues or re-reports the run
    from stages.evaluate import run_eval

    run_eval(config, config.train.output_dir)
    return 0


def cmd_encoding_study(args) -> int:
    from pipeline.studies.encoding import main as study_main

    return study_main(args.study_args)
def cmd_bench(args) -> int:
    from pipeline.bench import run_bench
    from pipeline.embedded import main_build_default

    main_build_default("build/default", force=False)  # the demo model and data the bench runs on
    command = "python -m pipeline bench" + (" --quick" if args.quick else "")
    result, path = run_bench(quick=args.quick, out_dir=args.out, command=command)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


# --- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument(VERBOSE, action="store_true",
                        help="show third-party logs and warnings (vLLM, transformers, datasets, torch); also after the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("build-default", help="build the embedded tiny base model and corpora")
    p.add_argument("--out", default="build/default", help="output directory (default: build/default)")
    p.add_argument("--force", action="store_true", help="rebuild even if the recipe is unchanged")
    p.set_defaults(func=cmd_build_default)

    p = sub.add_parser("cache-teacher", help="stage one: cache the teacher's top-k non-target log-probs")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="delete a cache of another model/data/settings in cache.dir")
    scale = p.add_argument_group("scale-out (README: Running at scale)")
    scale.add_argument("--num-workers", type=int, default=None,
                       help="data-parallel workers; shard i goes to worker i mod N (default: SLURM_ARRAY_TASK_COUNT or WORLD_SIZE, else 1)")
    scale.add_argument("--worker-rank", type=int, default=None,
                       help="this worker's rank (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN or RANK)")
    scale.add_argument("--launcher", choices=("none", "ray"), default="none",
                       help="none: this process is one worker; ray: run all N workers as Ray tasks, then merge")
    scale.add_argument("--ray-address", default=None, help="existing Ray cluster (default: start a local one)")
    p.set_defaults(func=cmd_cache_teacher)

    p = sub.add_parser("merge-manifest", help="join the workers' manifest parts into manifest.json (refuses gaps/overlaps)")
    p.add_argument("cache", help="cache directory or URI (s3://...)")
    p.set_defaults(func=cmd_merge_manifest)

    p = sub.add_parser("verify", help="check a cache's schema, counts and checksums (exit 1 if bad)")
    p.add_argument("cache", help="cache directory or URI (s3://...: downloaded to --local-dir first)")
    p.add_argument("--local-dir", default="", help="local copy of a remote cache (default: ~/.cache/mtcache/remote/<hash>)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="show one cached position: target and top-k, decoded")
    p.add_argument("cache", help="cache directory")
    p.add_argument("--example", type=int, default=0, help="example id (default 0)")
    p.add_argument("--position", type=int, default=0, help="position i predicts token i+1 (default 0)")
    p.add_argument("--model", default=None, help="model dir whose tokenizer decodes ids (default: the cache's teacher)")
    p.add_argument("--top", type=int, default=10, help="how many cached tokens to show (default 10)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="stage two: train a LoRA adapter on the cache with the masked KL")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="accept a cache made by other weights (the tokenizer must still match)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="learning vs forgetting of an adapter (or the base model alone)")
    _add_config_args(p)
    p.add_argument("--run", default=None, help="a train.output_dir; its config.yaml is used (default: base model only)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="grid of runs (method x lambda x seed) over one cache, table + frontier plot")
    _add_config_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("approx-study", help="estimators' D_k vs the exact masked KL on held-out data; tail vs live")
    _add_config_args(p)
    p.set_defaults(func=cmd_approx_study)

    p = sub.add_parser("demo", help="build-default -> cache-teacher -> train on the embedded default")
    _add_config_args(p)
    p.add_argument("--out", default="build/default", help="where the embedded default is built")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("encoding-study", help="bytes/token vs D_k error of the cache encodings (JSON + markdown)",
                       add_help=False)
    p.add_argument("study_args", nargs=argparse.REMAINDER, help="see `python -m pipeline encoding-study --help`")
    p.set_defaults(func=cmd_encoding_study)
    for name, (_, summary) in TOOLS.items():  # listed here; main() hands their arguments to them
        sub.add_parser(name, help=summary, add_help=False)
    p = sub.add_parser("bench", help="speed and memory side by side: stage one vs prefill, stage two steps, reader",
                       description="Writes <out>/<UTC time>.json and .md and prints the tables. Full run: "
                                   "~10 min on 2 CPU cores; --quick: tiny shapes, every section, seconds-minutes.")
    p.add_argument("--quick", action="store_true", help="tiny shapes (checks the bench runs; figures mean nothing)")
    p.add_argument("--out", default="runs/bench", help="output directory (default: runs/bench)")
    p.set_defaults(func=cmd_bench)
    return parser


def run_tool(name: str, argv: list[str]) -> int:
    """A measurement tool's own `main(argv)`, its program name shown as `python -m pipeline NAME`."""
    import importlib

    module = importlib.import_module(TOOLS[name][0])
    sys.argv[0] = f"python -m pipeline {name}"
    try:
        result = module.main(argv)
    except USER_ERRORS as err:  # as for the commands: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = VERBOSE in argv  # global, before or after the command: taken out before anything parses
    argv = [a for a in argv if a != VERBOSE]
    if not verbose:  # before vLLM, transformers, datasets and torch are imported (pipeline/quiet.py)
        quiet_third_party()
    if argv and argv[0] in TOOLS:
        return run_tool(argv[0], argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # only encoding-study passes options through
    if extra and args.command != "encoding-study":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.study_args = [*extra, *args.study_args]
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
