"""The command table of `python -m pipeline`: every command, its arguments and its handler, once.

    python -m pipeline --help              # the table's one-line helps
    python -m pipeline sweep --help        # one entry: its description, example, arguments (and sweep.* keys)

A `Command` names its one-line help (the top-level listing), a description holding at least one
example command line (its `--help` page), its arguments as `arg(flags..., **argparse kwargs)`, and
the handler run on the parsed values. Product commands come first; the instruments (benchmarks and
studies, STYLE.md item 7) after: their code lives in pipeline/bench/ and pipeline/studies/ as plain
functions, called through `call("module:function")` with the parsed values as keyword arguments.
Heavy imports happen in the handlers, so listing and parsing stay instant. pipeline/cli.py `main`
is the entry point around `run_command`: the global `--verbose` and the one-line `error: ...`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.embedded.recipe import BACKBONES

__all__ = ["Command", "COMMANDS", "arg", "call", "top_parser", "command_parser", "run_command", "settings_help"]

DEFAULT_CONFIG = "configs/demo.yaml"
Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **kwargs: Any) -> Arg:
    """One argument, as `parser.add_argument(*flags, **kwargs)`; `group="title"` lists it under that heading."""
    return flags, kwargs


CONFIG_ARGS = (arg("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})"),
               arg("overrides", nargs="*", metavar="section.key=value",
                   help="override config values (every key: docs/configuration.md), e.g. train.reg_weight=0.5"))
STUDY_CONFIG = "configs/sweep_demo.yaml"  # the studies' grid; the demo config has no sweep of its own
STUDY_CONFIG_ARGS = (arg("--config", default=STUDY_CONFIG, help=f"YAML config (default: {STUDY_CONFIG})"),
                     arg("overrides", nargs="*", metavar="section.key=value",
                         help="override config values, e.g. 'sweep.seeds=[0]' sweep.output_dir=runs/mine"))


@dataclass(frozen=True)
class Command:
    name: str
    help: str                                      # one line in `python -m pipeline --help`
    description: str                               # its `--help` page: what it does + an example command line
    handler: Callable[[argparse.Namespace], int]   # runs it on the parsed arguments; returns the exit status
    args: tuple[Arg, ...] | Callable[[], tuple[Arg, ...]] = ()  # a callable: arguments read from a dataclass
    keys: str = ""                                 # a config section whose keys `--help` lists ("sweep")
    instrument: bool = False                       # a benchmark or study: listed apart from the product


def _function(target: str) -> Callable:
    """The function a `module:function` string names, imported when a command runs (not to build --help)."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def call(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler calling `module:function` with the parsed values as keyword arguments; an int result is the
    exit status, anything else means 0."""
    def handler(args: argparse.Namespace) -> int:
        values = {key: value for key, value in vars(args).items() if key != "command_line"}
        result = _function(target)(**values)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    return handler


def _config(args):
    from pipeline.config import load_config

    return load_config(args.config, args.overrides)


def on_config(target: str) -> Callable[[argparse.Namespace], int]:
    """A handler calling `module:function` on the config from --config and the overrides (loaded first,
    so a bad key fails before the heavy imports)."""
    def handler(args: argparse.Namespace) -> int:
        _function(target)(_config(args))
        return 0
    return handler


# --- handlers of the product commands ---------------------------------------------------------------
def cmd_build_default(args) -> int:
    from pipeline.embedded.build import main_build_default

    main_build_default(args.out, force=args.force, backbone=args.backbone)
    return 0


def _scenario_check(args) -> int:
    config = _config(args)
    from pipeline.studies.scenario_check import run_scenario_check

    run_scenario_check(config, run=args.run, out=args.out)
    return 0


INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)


def cmd_cache_teacher(args) -> int:
    config = _config(args)  # bad keys fail fast, before the heavy imports
    from stages.teacher.runner import run_cache_teacher

    try:
        print(run_cache_teacher(config, overwrite=args.overwrite, launcher=args.launcher, num_workers=args.num_workers,
                                worker_rank=args.worker_rank, ray_address=args.ray_address).render())
    except KeyboardInterrupt:
        print(f"\ninterrupted: {config.cache.dir} keeps every shard finished so far; rerun the same command to resume",
              file=sys.stderr)
        return INTERRUPTED
    return 0


def cmd_merge_manifest(args) -> int:
    from stages.teacher.scale_out.merge import merge_parts

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


def cmd_show_mask(args) -> int:
    from pipeline.show_mask import show_mask

    text, status = show_mask(_config(args), args.example, args.tokens)
    print(text)
    return status


def cmd_export(args) -> int:
    from pipeline.config import config_for_run
    from stages.student.export import export_merged
    from stages.student.runner import check_finished

    config = config_for_run(args.run, [])
    check_finished(config, args.run)
    out = export_merged(Path(args.run) / "adapter", config.model, args.out, dtype=args.dtype)
    print(f"wrote {out}: {config.model} with the adapter of {args.run} merged (load it with "
          "AutoModelForCausalLM.from_pretrained, or serve it with vLLM)")
    return 0


def cmd_train(args) -> int:
    config = _config(args)
    from stages.student.runner import run_train

    if args.allow_model_mismatch:
        config.train.allow_model_mismatch = True
    run_train(config, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from pipeline.config import config_for_run
    from stages.eval.evaluate import run_eval

    config = config_for_run(args.run, args.overrides) if args.run else _config(args)
    if args.lm_eval is not None:  # --lm-eval '' turns off the config's tasks
        config.eval.lm_eval.tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    if config.eval.lm_eval.tasks:
        from stages.eval.harness import check_harness

        check_harness(config)  # the extra, the task names, a chat template: before any model is evaluated
    if args.run:
        from stages.student.runner import check_finished

        check_finished(config, args.run)  # an unfinished (extended) run's adapter/ is not what its config.yaml describes
    run_eval(config, args.run)
    return 0


def cmd_demo(args) -> int:
    config = _config(args)
    from pipeline.embedded.build import main_build_default
    from stages.student.runner import run_train
    from stages.teacher.runner import run_cache_teacher

    main_build_default(args.out, force=False)
    print(run_cache_teacher(config).render())  # a finished cache is reused, a killed one resumed
    run_train(config, resume=True)  # likewise: re-running the demo continues or re-reports the run
    from stages.eval.evaluate import run_eval

    run_eval(config, config.train.output_dir)
    return 0


# --- handlers of the instruments ----------------------------------------------------------------------
def cmd_sweep(args) -> int:
    config = _config(args)
    if args.shard:
        config.sweep = dataclasses.replace(config.sweep, shard=args.shard)  # re-checked as the key is
    from pipeline.studies.sweep import quick_config, run_sweep

    run_sweep(quick_config(config) if args.quick else config)
    return 0


def cmd_encoding_study(args) -> int:
    from pipeline.studies.encoding.run import run_and_print
    from pipeline.studies.encoding.settings import StudyConfig

    values = vars(args)
    run_and_print(StudyConfig(**{f.name: values[f.name] for f in dataclasses.fields(StudyConfig)}), args.command_line)
    return 0


def cmd_bench(args) -> int:
    from pipeline.bench import run_bench
    from pipeline.embedded.build import main_build_default

    main_build_default("build/default", force=False)  # the demo model and data the bench runs on
    command = "python -m pipeline bench" + (" --quick" if args.quick else "")
    result, path = run_bench(quick=args.quick, out_dir=args.out, command=command)
    print(path.with_suffix(".md").read_text())
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


def cmd_trace_stage_one(args) -> int:
    from pipeline.bench.file_trace import trace_stage_one

    # The traced run goes through this table, as `python -m pipeline cache-teacher` does.
    return trace_stage_one(args.config, args.json, args.overrides, run_cli=run_command)


def _study_args() -> tuple[Arg, ...]:
    """encoding-study's options: one per StudyConfig field (pipeline/studies/encoding/settings.py)."""
    from pipeline.studies.encoding.settings import StudyConfig

    out = []
    for f in dataclasses.fields(StudyConfig):
        flag, text = f"--{f.name.replace('_', '-')}", _help_of(f)
        if f.type in (bool, "bool"):
            out.append(arg(flag, action="store_true", help=text or "(flag)"))
        else:
            out.append(arg(flag, type=type(f.default), default=f.default, help=f"{text} (default: {f.default})".strip()))
    return tuple(out)


# --- the table --------------------------------------------------------------------------------------
_TABLE = (
    Command("build-default", "build the embedded tiny base model and corpora (cached, rebuilt on recipe change)",
            "Builds the embedded default (pipeline/embedded/): corpora, tokenizer, the tiny base model and the stubs\n"
            "scenario's data. --backbone qwen2: the second backbone (Qwen2-shaped, ~2.3x the parameters, same recipe\n"
            "and prose) into build/qwen2.\n\n"
            "    python -m pipeline build-default --out build/default\n"
            "    python -m pipeline build-default --backbone qwen2", cmd_build_default,
            (arg("--out", default=None, help="output directory (default: build/default; build/BACKBONE for another backbone)"),
             arg("--force", action="store_true", help="rebuild even if the recipe is unchanged"),
             arg("--backbone", default="llama", choices=tuple(BACKBONES),
                 help="llama: the default base model; qwen2: the second backbone (default: llama)"))),
    Command("cache-teacher", "stage one: teacher pass over the data into zstd Parquet shards + manifest",
            "Caches the teacher's top-k non-target log-probs per position (docs/design.md §3; docs/scale-out.md).\n\n"
            "    python -m pipeline cache-teacher --config configs/demo.yaml cache.k=64\n"
            "    python -m pipeline cache-teacher --config my.yaml --num-workers 8 --worker-rank 0",
            cmd_cache_teacher,
            (*CONFIG_ARGS,
             arg("--overwrite", action="store_true", help="delete a cache of another model/data/settings in cache.dir"),
             arg("--num-workers", type=int, default=None, group="scale-out (docs/scale-out.md)",
                 help="data-parallel workers; shard i goes to worker i mod N "
                      "(default: SLURM_ARRAY_TASK_COUNT or WORLD_SIZE, else 1)"),
             arg("--worker-rank", type=int, default=None, group="scale-out (docs/scale-out.md)",
                 help="this worker's rank (default: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN or RANK)"),
             arg("--launcher", choices=("none", "ray"), default="none", group="scale-out (docs/scale-out.md)",
                 help="none: this process is one worker; ray: run all N workers as Ray tasks, then merge"),
             arg("--ray-address", default=None, group="scale-out (docs/scale-out.md)",
                 help="existing Ray cluster (default: start a local one)"))),
    Command("merge-manifest", "join the manifest parts of N stage-one workers (automatic when the last finishes)",
            "Joins the workers' manifest parts into manifest.json; refuses gaps and overlaps.\n\n"
            "    python -m pipeline merge-manifest runs/demo/cache", cmd_merge_manifest,
            (arg("cache", help="cache directory or URI (s3://...)"),)),
    Command("verify", "check a cache's schema, counts and checksums; names any bad shard (exit 1 if bad)",
            "Checks every shard of a cache against its manifest: schema, row and token counts, sha256.\n\n"
            "    python -m pipeline verify runs/demo/cache", cmd_verify,
            (arg("cache", help="cache directory or URI (s3://...: downloaded to --local-dir first)"),
             arg("--local-dir", default="", help="local copy of a remote cache (default: ~/.cache/mtcache/remote/<hash>)"))),
    Command("inspect", "show one cached position: target and top-k with probabilities, decoded",
            "Prints one cached position: the target token and the cached top-k, decoded, with probabilities.\n\n"
            "    python -m pipeline inspect runs/demo/cache --example 3 --position 10", cmd_inspect,
            (arg("cache", help="cache directory"),
             arg("--example", type=int, default=0, help="example id (default 0)"),
             arg("--position", type=int, default=0, help="position i predicts token i+1 (default 0)"),
             arg("--model", default=None, help="model dir whose tokenizer decodes ids (default: the cache's teacher)"),
             arg("--top", type=int, default=10, help="how many cached tokens to show (default 10)"))),
    Command("show-mask", "print one example of the data with its trained text marked, before any teacher time",
            "Reads one example as stage one does (format, chat template, mask, truncation) and prints the text with\n"
            "the trained spans between ⟦ and ⟧ (which tokens are trained: docs/chat-data.md); a refused example\n"
            "prints the reason (exit 1).\n\n"
            "    python -m pipeline show-mask --config configs/demo.yaml --example 3\n"
            "    python -m pipeline show-mask --config my.yaml data.path=chats.jsonl --example 0 --tokens",
            cmd_show_mask,
            (*CONFIG_ARGS,
             arg("--example", type=int, default=0, help="example id: the row's 0-based index in data.path (default 0)"),
             arg("--tokens", action="store_true", help="also list every token: position, id, T if trained, text"))),
    Command("train", "stage two: LoRA on the cached shards with the masked KL",
            "Trains a LoRA adapter on the cache: CE on the target plus the method's regularizer (train.method).\n\n"
            "    python -m pipeline train --config configs/demo.yaml train.method=tail train.reg_weight=0.5",
            cmd_train,
            (*CONFIG_ARGS,
             arg("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir"),
             arg("--allow-model-mismatch", action="store_true",
                 help="accept a cache made by other weights (the tokenizer must still match)"))),
    Command("export", "a run's adapter merged into a plain HF model directory (transformers and vLLM load it)",
            "Merges the run's LoRA adapter into its base model (the model in the run's config.yaml) and saves a plain\n"
            "model directory with the base's tokenizer, chat template and generation config.\n\n"
            "    python -m pipeline export --run runs/demo/train --out exported/demo-merged",
            cmd_export,
            (arg("--run", required=True, help="a finished run directory (train.output_dir)"),
             arg("--out", required=True, help="output directory (new or empty)"),
             arg("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                 help="saved weights' dtype (default: the base's)"))),
    Command("eval", "learning (held-out target) vs forgetting (retention set, drift) of a run",
            "Learning vs forgetting of an adapter, or of the base model alone without --run; writes eval.json.\n\n"
            "    python -m pipeline eval --run runs/demo/train\n"
            "    python -m pipeline eval --run runs/demo/train --lm-eval mtcache_source_heldout   (lm-evaluation-harness, extra `eval`)",
            cmd_eval,
            (*CONFIG_ARGS,
             arg("--run", default=None, help="a train.output_dir; its config.yaml is used (default: base model only)"),
             arg("--lm-eval", default=None, metavar="TASKS", help=(
                 "comma-separated lm-evaluation-harness tasks run on the base and the adapted model (= eval.lm_eval.tasks; "
                 "settings: eval.lm_eval.*), e.g. mtcache_source_heldout (the embedded default's) or wikitext; '' = none")))),
    Command("demo", "build-default -> cache-teacher -> train -> eval on the embedded default",
            "The whole pipeline on the embedded default; a finished step is reused, a killed one resumed.\n\n"
            "    python -m pipeline demo --config configs/demo.yaml", cmd_demo,
            (*CONFIG_ARGS, arg("--out", default="build/default", help="where the embedded default is built"))),
    # --- instruments: pipeline/studies/, pipeline/bench/ ---
    Command("sweep", "method x lambda x seed over one cache: results table and frontier plot",
            "Trains and evaluates one run per grid point over one cache; writes results.json/.md, frontier.png.\n\n"
            "    python -m pipeline sweep --config configs/sweep_demo.yaml 'sweep.seeds=[0]'",
            cmd_sweep, (*STUDY_CONFIG_ARGS, arg("--shard", default="", metavar="i/N", help=(
                "run only runs i, i+N, ... of the grid, i from 0 (= sweep.shard; N processes split one grid, cache built first)")),
                arg("--quick", action="store_true", help=(
                    "the grid in miniature, to check it runs: the first two seeds, each lambda grid's two ends, 10 steps "
                    "(fewer if train.max_steps is lower), <= 16 eval examples, into <output_dir>-quick, no records; the cache "
                    "is the configured one"))),
            keys="sweep", instrument=True),
    Command("approx-study", "cached estimators' D_k vs the exact masked KL for k up to |V|-1; tail vs live",
            "Scores fixed students (sweep runs) on held-out data: each cached estimator's D_k vs the exact D.\n\n"
            "    python -m pipeline approx-study --config configs/sweep_demo.yaml approx.examples=50",
            on_config("pipeline.studies.approx_study:run_approx_study"), STUDY_CONFIG_ARGS, keys="approx",
            instrument=True),
    Command("scenario-check", "is a target in the learned regime, and how local is it (trigram, 16-grams)",
            "The held-out target set's base and adapted loss, the share of positions where the adapted model is sure\n"
            "(q_y > 0.9) and the base is not (p_y < 0.1), a trigram fitted on the training rows, and the held-out\n"
            "16-grams found in train; per row group (first word) too (pipeline/studies/scenario_check.py).\n\n"
            "    python -m pipeline scenario-check --config configs/stubs.yaml --run runs/stubs/sweep/none-l0-s0",
            _scenario_check, CONFIG_ARGS + (
                arg("--run", default=None, help="a finished run directory: its adapter is scored too"),
                arg("--out", default=None, help="also write the figures as JSON here"))),
    Command("frontier", "a sweep's curves against one reference curve at equal target loss (gap, 2 SE)",
            "Each curve against the reference at equal target loss, both interpolated seed by seed between their own "
            "points, never extrapolated: the gap at the midpoint of their overlap and the largest gap over it (2 SE), "
            "the retention perplexity change; then each point (seed means) against the reference "
            "(pipeline/studies/frontier.py).\n\n"
            "    python -m pipeline frontier runs/lalora/sweep/results.json --reference tail\n"
            "    python -m pipeline frontier runs/lalora/sweep/results.json --reference 'lalora diag' --out gaps.md",
            call("pipeline.studies.frontier:frontier_report"),
            (arg("results", nargs="+", help="a sweep's results.json (several: their runs pooled)"),
             arg("--reference", default="tail", help="the curve compared against, as labelled in results.md (default: tail)"),
             arg("--out", default=None, help="also write the markdown table here"),
             arg("--goal", default=None, help=(
                 "LAMBDAS:GAP:BOUND, e.g. 1,3:0.005:0.010: per curve, is its gap at the reference's points of these "
                 "lambdas and its largest gap over the overlap <= GAP, with gap + 2 SE <= BOUND (issue 27's test)")),
             arg("--forgetting", default="source_loss_increase", help=(
                 "the forgetting axis: source_loss_increase (default) or lm_eval:TASK:METRIC (a sweep run with "
                 "sweep.lm_eval_metric=TASK:METRIC)"))), instrument=True),
    Command("encoding-study", "bytes/token vs D_k error of every cache encoding (BENCHMARKS.md \"Cache encodings\")",
            "Writes every candidate encoding as a real shard: bytes/token and the error it adds to D_k "
            "(pipeline/studies/encoding/).\n\n"
            "    python -m pipeline encoding-study --out runs/encoding-study\n"
            "    python -m pipeline encoding-study --speed-only --examples 50", cmd_encoding_study, _study_args,
            instrument=True),
    Command("bench", "speed and memory, side by side: stage one, stage two, reader (runs/bench/)",
            "Writes <out>/<UTC time>.json and .md and prints the tables. Full run: ~10 min on 2 CPU cores; "
            "--quick: tiny shapes, every section, seconds-minutes.\n\n"
            "    python -m pipeline bench --quick", cmd_bench,
            (arg("--quick", action="store_true", help="tiny shapes (checks the bench runs; figures mean nothing)"),
             arg("--out", default="runs/bench", help="output directory (default: runs/bench)")), instrument=True),
    Command("bench-step", "one stage-two step per method: time and peak memory vs a CE-only step",
            "CE-only (`none`) vs cached `tail` vs `live` teacher on the same batch (pipeline/bench/step.py).\n\n"
            "    python -m pipeline bench-step --vocab 32000 --batch 8 --seq 256\n"
            "    python -m pipeline bench-step --model DIR --seq 1024 --dtype bfloat16 --fused",
            call("pipeline.bench.step:bench_step"),
            (arg("--model", help="local HF model dir (default: build a tiny random Llama)"),
             arg("--vocab", type=int, default=392, help="tiny model vocabulary (392 = the test fixture's)"),
             arg("--batch", type=int, default=8, help="sequences per step (default 8)"),
             arg("--seq", type=int, default=256, help="tokens per sequence (default 256)"),
             arg("--k", type=int, default=32, help="cached non-target tokens per position (default 32)"),
             arg("--steps", type=int, default=10, help="timed rounds, every method once per round (default 10)"),
             arg("--warmup", type=int, default=3, help="untimed rounds first (default 3)"),
             arg("--dtype", default="float32", choices=["float32", "bfloat16"]),
             arg("--methods", "--estimators", dest="estimators", nargs="+", default=None, metavar="METHOD",
                 help="train.method rows, the first is the ratios' base (default: none tail live)"),
             arg("--fused", action="store_true", help="add the rows none+fused tail+fused"),
             arg("--chunk", type=int, default=0, help="fused rows per chunk (0 = auto from the vocabulary)")),
            instrument=True),
    Command("bench-penalty", "lalora's weight penalty per step: diag vs kfac vs tri_kfac vs CE-only",
            "One LoRA step (CE + reg_weight * R, backward, AdamW) per curvature form on the same batch, interleaved; "
            "ratios to `lalora diag` and to `none`, and R's own forward + backward (pipeline/bench/penalty.py).\n\n"
            "    python -m pipeline bench-penalty --shape both --steps 7\n"
            "    python -m pipeline bench-penalty --shape large --batch 8 --seq 256",
            call("pipeline.bench.penalty:bench_penalty"),
            (arg("--shape", default="both", choices=["demo", "large", "both"],
                 help="demo: tiny Llama (hidden 128, rank 8, 8 x 256); large: hidden 1024, rank 16, 2 x 128 (default: both)"),
             arg("--steps", type=int, default=7, help="timed rounds, every row once per round (default 7)"),
             arg("--warmup", type=int, default=2, help="untimed rounds first (default 2)"),
             arg("--batch", type=int, default=0, help="sequences per step instead of the shape's (the penalty's share falls with tokens)"),
             arg("--seq", type=int, default=0, help="tokens per sequence instead of the shape's")),
            instrument=True),
    Command("bench-estimators", "the cached estimators' candidates vs today's tail: bytes, stage one tok/s, fused step",
            "Stage one end to end (one vLLM pooler engine, k and draws set per candidate) and one fused LoRA step per "
            "candidate, interleaved; medians and ratios to `tail` k=32 (pipeline/bench/estimators.py).\n\n"
            "    python -m pipeline bench-estimators --repeats 7",
            call("pipeline.bench.estimators:bench_estimators"),
            (arg("--repeats", type=int, default=7, help="timed repetitions, every candidate once each (default 7)"),
             arg("--sequences", type=int, default=64, help="training rows stage one scores per pass (default 64)"),
             arg("--length", type=int, default=256, help="data.max_length and the step's sequence length (default 256)"),
             arg("--batch", type=int, default=8, help="sequences per training step (default 8)")),
            instrument=True),
    Command("bench-teacher", "stage-one engines' throughput vs plain prefill on random models",
            "vLLM plain prefill vs the vLLM engine's score() (pooler, prompt_logprobs) vs the hf engine's "
            "(pipeline/bench/throughput.py).\n\n"
            "    python -m pipeline bench-teacher\n"
            "    python -m pipeline bench-teacher --model-dir PATH --json out.json",
            call("pipeline.bench.throughput:bench_teacher"),
            (arg("--model-dir", help="measure this model instead of building the random ones"),
             arg("--sequences", type=int, default=64, help="random sequences scored (default 64)"),
             arg("--length", type=int, default=256, help="tokens per sequence (default 256)"),
             arg("-k", type=int, default=32, help="cached non-target tokens per position (default 32)"),
             arg("--repeats", type=int, default=3, help="timed repeats, best kept (default 3)"),
             arg("--json", dest="json_path", help="also write the results here")), instrument=True),
    Command("bench-scaling", "stage one with 1, 2, ... workers: tokens/s per worker count",
            "N `cache-teacher --num-workers N` processes at once per N, each into a fresh cache "
            "(pipeline/bench/scaling.py).\n\n"
            "    python -m pipeline bench-scaling --config configs/demo.yaml --workers 1 2",
            call("pipeline.bench.scaling:bench_scaling"),
            (arg("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)"), *CONFIG_ARGS),
            instrument=True),
    Command("bench-encoding-write", "stage one end to end per cache encoding: what writing each one costs",
            "Every encoding through stage one on one vLLM engine, best of --rounds (pipeline/bench/encoding_write.py).\n\n"
            "    python -m pipeline bench-encoding-write --rounds 5",
            call("pipeline.bench.encoding_write:bench_encoding_write"),
            (arg("--model", default="build/default/base-model", help="teacher model dir (default: the demo's)"),
             arg("--data", default="build/default/data/target_train.jsonl", help="JSONL text (default: the demo's)"),
             arg("--examples", type=int, default=64, help="examples scored (default 64)"),
             arg("--length", type=int, default=256, help="max tokens per example (default 256)"),
             arg("--rounds", type=int, default=3, help="rounds, best tok/s kept (default 3)")), instrument=True),
    Command("bench-logging", "stage-two time per step with train.report_to tensorboard vs none",
            "Real `run_train` runs, tensorboard and none interleaved (pipeline/bench/logging_cost.py); "
            "needs the config's cache (make demo).\n\n"
            "    python -m pipeline bench-logging --runs 5 --steps 10 --batch-size 1",
            call("pipeline.bench.logging_cost:bench_logging"),
            (arg("--config", default=DEFAULT_CONFIG, help="a config whose cache exists (default: the demo's)"),
             arg("--runs", type=int, default=5, help="runs per setting, interleaved (default 5)"),
             arg("--steps", type=int, default=14, help="optimizer steps per run (default 14)"),
             arg("--batch-size", type=int, default=0, help="train.batch_size for the runs (default: the config's)")),
            instrument=True),
    Command("rank-rows", "(under torchrun) which cache rows each DDP rank of stage two reads",
            "Lists the example ids each rank's training dataloader yields in one epoch into "
            "train.output_dir/rank_rows/rank-R.json (pipeline/bench/rank_rows.py).\n\n"
            "    torchrun --nproc_per_node 2 -m pipeline rank-rows --config configs/demo.yaml\n"
            "    python -m pipeline rank-rows --config configs/demo.yaml     # one process: rank 0 of 1",
            on_config("pipeline.bench.rank_rows:write_rank_rows"), CONFIG_ARGS, instrument=True),
    Command("gpu-bench", "on CUDA: stage one (Triton kernel) and stage two (fused) vs plain passes",
            "Random bf16 models of two real shapes; every figure a ratio to a baseline timed in the same process "
            "(pipeline/bench/gpu.py). Writes gpu_bench.json and gpu_bench.md under --out.\n\n"
            "    python -m pipeline gpu-bench --out runs/bench/gpu --models qwen2.5-0.5b --stages one",
            call("pipeline.bench.gpu:gpu_bench"),
            (arg("--out", default="runs/bench/gpu", help="folder for gpu_bench.json/.md (default: runs/bench/gpu)"),
             arg("--models", nargs="+", default=None, help="model shapes (default: all: qwen2.5-0.5b llama-3.2-1b)"),
             arg("--stages", nargs="+", default=None, choices=["one", "two"], help="default: one two")),
            instrument=True),
    Command("plot-run", "a run's CE and regularizer curves (PNG) drawn from its TensorBoard event file",
            "Draws train/ce and train/kl or train/penalty by step (pipeline/plot_run.py); --check also compares "
            "every log.csv figure with its scalar (exit 1 on a difference).\n\n"
            "    python -m pipeline plot-run runs/demo/train --out docs/demo_curves.png",
            call("pipeline.plot_run:plot_and_check"),
            (arg("run", help="a train.output_dir (holds tensorboard/)"),
             arg("--out", default=None, help="PNG path (default: <run>/curves.png)"),
             arg("--check", action="store_true", help="also compare the event file with log.csv, step by step")),
            instrument=True),
    Command("config-docs", "write docs/configuration.md from the settings' field help (--check: exit 1 if stale)",
            "Renders the configuration reference from each settings field's `metadata={\"help\": ...}` "
            "(pipeline/config_docs.py); tests/test_config_docs.py fails while the committed page is stale.\n\n"
            "    python -m pipeline config-docs\n    python -m pipeline config-docs --check",
            call("pipeline.config_docs:write_config_reference"),
            (arg("--out", default="docs/configuration.md", help="where to write (default: docs/configuration.md)"),
             arg("--check", action="store_true", help="write nothing; exit 1 if the file is stale"))),
    Command("trace-stage-one", "which project files one stage-one run walks through, and how often it comes back",
            "Runs cache-teacher in this process under sys.setprofile and reports the files visited, the stays "
            "and the call-stack cycles (pipeline/bench/file_trace.py).\n\n"
            "    python -m pipeline trace-stage-one --config configs/demo.yaml cache.engine=hf --json trace.json",
            cmd_trace_stage_one,
            (arg("--config", default=DEFAULT_CONFIG, help=f"YAML config (default: {DEFAULT_CONFIG})"),
             arg("--json", default="", help="also write the summary here"),
             arg("overrides", nargs="*", metavar="section.key=value",
                 help="config overrides (cache.engine=hf and a temporary cache.dir come first)")), instrument=True),
)
COMMANDS: dict[str, Command] = {c.name: c for c in _TABLE}


# --- parsers -----------------------------------------------------------------------------------------
def _help_of(f: dataclasses.Field) -> str:
    """A settings field's help (`metadata={"help": ...}`), `%` escaped for argparse."""
    return str(f.metadata.get("help", "")).replace("%", "%%")


def settings_help(section: str) -> str:
    """Every `section.key` of the config with its type, default and help: what an override can set."""
    from pipeline.config import Config

    (owner,) = [f for f in dataclasses.fields(Config) if f.name == section]
    lines = [f"{section}.* keys (in the config's `{section}:` section, or as {section}.key=value):"]
    for f in dataclasses.fields(owner.default_factory):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {section}.{f.name}  {getattr(f.type, '__name__', f.type)}  (default: {default!r})")
        if f.metadata.get("help"):
            lines.append(textwrap.fill(str(f.metadata["help"]), 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _listing() -> str:
    def block(title: str, instrument: bool) -> list[str]:
        return [title] + [f"  {c.name:<21} {c.help}" for c in _TABLE if c.instrument == instrument]

    return "\n".join([*block("commands:", False), "", *block("instruments (benchmarks and studies):", True), "",
                      "Commands that take a config accept `--config FILE` and trailing `section.key=value` overrides.",
                      "Third-party logs (vLLM, transformers, datasets, torch) are held back unless `--verbose` is given,",
                      "before or after the command; errors always show."])


def top_parser() -> argparse.ArgumentParser:
    """`python -m pipeline [--verbose] COMMAND ...`: the command's name; its arguments go to `command_parser`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", usage="%(prog)s [-h] [--verbose] COMMAND [ARGS ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Teacher-logit cache for LoRA fine-tuning: "
                                                 "`python -m pipeline COMMAND --help` shows one command.",
                                     epilog=_listing())
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party logs and warnings (vLLM, transformers, datasets, torch); also after the command")
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_parser(command: Command) -> argparse.ArgumentParser:
    """The `python -m pipeline NAME` parser of one table entry: description, arguments, config keys."""
    description = "\n\n".join(p if p.startswith(" ") else textwrap.fill(p, 100)  # examples keep their lines
                              for p in command.description.split("\n\n"))
    parser = argparse.ArgumentParser(prog=f"python -m pipeline {command.name}", description=description,
                                     epilog=settings_help(command.keys) if command.keys else None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, Any] = {}
    for flags, kwargs in command.args() if callable(command.args) else command.args:
        kwargs = dict(kwargs)
        title = kwargs.pop("group", None)
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        (groups[title] if title else parser).add_argument(*flags, **kwargs)
    return parser


def run_command(argv: list[str]) -> int:
    """Parse `argv` (`COMMAND [arguments]`) against the table and run the command's handler."""
    parser = top_parser()
    if all(a.startswith("-") for a in argv):  # no command: argparse would also demand the hidden ARGS
        if {"-h", "--help"} & set(argv):
            parser.parse_args(["--help"])
        parser.error(f"a COMMAND is required{f', not only {argv}' if argv else ''} (see `python -m pipeline --help`)")
    top = parser.parse_args(argv)
    command = COMMANDS[top.command]
    # intermixed: `k=v` overrides may come before and after options (`--example 3 data.x=y` and the reverse)
    args = command_parser(command).parse_intermixed_args(top.args)
    args.command_line = " ".join(["python -m pipeline", *argv])  # the encoding study records it
    return command.handler(args)
