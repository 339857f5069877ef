"""`lesionflow`: the one console script (what dvc.yaml, people and the flows call).

Every known failure ends in ONE line on stderr, `error: ...`, naming the file / key / id and what to do next.
Exit status: 0 ok, 2 bad input (params, files, arguments: tasks.core.errors.InputError), 1 anything else
(a runtime failure). `--debug` (or LESIONFLOW_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.stages import get as get_stage
from tasks.core.config import FORCE_PRUNE_ENV, Params, dump_params, load_params, with_force_prune
from tasks.core.errors import InputError, LesionflowError
from tasks.core.io import Paths

# Telemetry/update checks off before any heavy library (prefect, mlflow, dvc, tensorflow) is imported; they
# are imported inside the commands that need them, so `lesionflow stage` (what DVC runs) stays quick.
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}.items():
    os.environ.setdefault(_k, _v)

DEBUG_ENV = "LESIONFLOW_DEBUG"


class UsageError(InputError):
    """The command line itself is wrong (unknown command or option, a missing or malformed argument)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is raised (one `error:` line and exit 2 from main), not printed + exited."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# --------------------------------------------------------------------------- output and errors
def _emit(obj: object) -> None:
    """A command's result as stable JSON on stdout (what scripts and the flows parse)."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def one_line(exc: BaseException) -> str:
    """The `error:` line for `exc`: its message on one line; unexpected errors also name their type and point
    at --debug."""
    text = getattr(exc, "summary", None) or str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "") if lines else ""
    known = isinstance(exc, LesionflowError) or any(c.__name__ == "IsicError" for c in type(exc).__mro__)
    if known:
        return msg or type(exc).__name__
    hint = f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"{type(exc).__name__}: {msg} {hint}" if msg else f"{type(exc).__name__} {hint}"


def exit_code(exc: BaseException) -> int:
    """2 for bad input (InputError and its subclasses, usage errors), 1 for every other failure."""
    if isinstance(exc, LesionflowError):
        return int(exc.exit_code)
    return 1


class _NoTraceback(logging.Formatter):
    """Wraps a console formatter so records print without their traceback (the UI's log handler keeps it)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _brief_console(args: argparse.Namespace) -> None:
    """Without --debug, Prefect's console log shows no tracebacks: the final `error:` line says what failed.
    Call after prefect is imported (importing it configures its handlers)."""
    if args.debug:
        return
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for h in lg.handlers:
            if type(h).__name__ == "PrefectConsoleHandler" and not isinstance(h.formatter, _NoTraceback):
                h.setFormatter(_NoTraceback(h.formatter))


# --------------------------------------------------------------------------- params
def _load(args: argparse.Namespace) -> Params:
    return load_params(args.params)  # ParamsError (exit 2) names the file and every bad key


def _force_prune(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "force_prune", False)) or os.environ.get(FORCE_PRUNE_ENV) == "1"


def cmd_params(args: argparse.Namespace) -> int:
    print(dump_params(_load(args)), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    stage = get_stage(args.name)  # InputError listing the stages
    params = _load(args)  # validated before any work starts
    if getattr(args, "force_prune", False) and stage.name != "ingest":
        raise UsageError(f"--force-prune applies to the ingest stage only, not {stage.name!r}")
    if stage.name == "ingest" and _force_prune(args):

        params = with_force_prune(params, str(args.params))
    summary = stage.run(params, Paths(Path(args.root).resolve()))
    _emit({"stage": stage.name, **(summary or {})})
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.fake.lesions import generate

    df = generate(Path(args.out), n=args.n, seed=args.seed, malignant_fraction=args.malignant_fraction,
                  image_size=args.size, trouble=not args.no_trouble)
    print(f"wrote {len(df)} metadata rows and images to {args.out}")
    return 0


def cmd_isic_server(args: argparse.Namespace) -> int:
    from tasks.fake.isic_server import serve_forever

    images = args.images
    if images is None:
        print("warning: `isic-server --root` is deprecated (everywhere else --root is the project root); "
              "use --images", file=sys.stderr)
        images = args.images_root
    folder = Path(images)
    if not (folder / "metadata.csv").is_file():
        raise InputError(f"{folder / 'metadata.csv'}: not found; --images must be a folder of images + "
                         "metadata.csv (as `lesionflow synth --out DIR` or `isic image download DIR` writes it)")
    serve_forever(folder, host=args.host, port=args.port, latency_ms=args.latency_ms,
                  fail_rate=args.fail_rate, rate_limit_every=args.rate_limit_every,
                  truncate_rate=args.truncate_rate, seed=args.seed, ready=lambda line: print(line, flush=True))
    return 0


# --------------------------------------------------------------------------- orchestration (flows/*.py)
def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import format_results, pipeline_flow, plan

    _brief_console(args)
    plan(Path(args.root), args.stages or None)  # config errors surface before Prefect starts its engine
    results = pipeline_flow(root=args.root, params=args.params, executor=args.executor,
                            stages=args.stages or None, force=args.force, force_prune=args.force_prune)
    print(format_results(results))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows import demo

    _brief_console(args)
    root = Path(args.root)
    print(demo.header(root, args.executor), flush=True)
    out = demo.demo(root, executor=args.executor, promote=not args.no_promote)
    print(demo.report(out))
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from flows.nightly import nightly_flow

    _brief_console(args)
    rec = nightly_flow(root=args.root, config=args.config, params=args.params, force_prune=args.force_prune)
    _emit(rec)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows import deploy

    _brief_console(args)
    root = Path(args.root).resolve()
    if args.dry_run:
        print(deploy.describe(root, args.config))
    elif args.pool:
        deploy.deploy_to_pool(root, args.pool, args.config, args.gpu_limit, say=print)
    else:
        deploy.serve(root, args.config, args.gpu_limit, say=print)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    from flows.pipeline import mlflow_ui_command

    cmd = mlflow_ui_command(port=args.port)
    print(" ".join(cmd) + f"    (in {Path(args.root).resolve()})")
    if args.dry_run:
        return 0
    exe = Path(sys.executable).parent / "mlflow"  # the venv's mlflow even when the venv is not activated
    return subprocess.call([str(exe) if exe.exists() else cmd[0], *cmd[1:]], cwd=args.root)


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.nightly import load_nightly
    from flows.promotion import promote_now

    root = Path(args.root).resolve()
    rec = promote_now(root, load_nightly(root / args.config), root / args.params, version=args.version,
                      force=args.force)
    _emit(rec)
    return 0


# --------------------------------------------------------------------------- apps (flows/apps/*.py)
def cmd_screen(args: argparse.Namespace) -> int:
    from flows.apps.screen import screen_files

    summary = screen_files(args.images, args.out, args.model, root=Path(args.root).resolve(),
                           max_pixels=args.max_pixels)
    _emit(summary)
    return 0


def cmd_synth_widefield(args: argparse.Namespace) -> int:
    from tasks.fake.widefield import synth_widefield

    files = synth_widefield(args.out, args.n, args.seed)
    _emit({"images": len(files), "out": str(args.out)})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from flows.apps.predict import predict

    summary = predict(args.model, args.inputs, args.out, root=Path(args.root).resolve(), max_pixels=args.max_pixels)
    _emit(summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.tracking import serve

    return serve(args.model, Path(args.root).resolve(), host=args.host, port=args.port)


# --------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def cmd_tune(args: argparse.Namespace) -> int:
    from flows.tune import tune

    _emit(tune(Path(args.root).resolve(), Path(args.params), n_trials=args.trials, timeout_s=args.timeout,
               apply=args.apply))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from flows.apps.card import card

    print(card(args.model_uri, Path(args.root).resolve()))
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from flows.drift import drift_now

    _emit(drift_now(Path(args.root).resolve(), args.config, version=args.version))
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from flows.apps.web import main as app_main

    return app_main(args)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lesionflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root holding dvc.yaml, data/ and reports/ (default: .)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of a failure (same as {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    force_prune_help = ("let ingest remove images its sources no longer list (sets ingest.force_prune=true for "
                        "this run only)")

    s = sub.add_parser("params", help="print the validated params (defaults filled in)")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name")
    s.add_argument("--force-prune", action="store_true", help=force_prune_help + " (ingest only)")
    s.set_defaults(func=cmd_stage)

    s = sub.add_parser("synth", help="write an ISIC-style folder of synthetic lesions")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--malignant-fraction", type=float, default=0.3)
    s.add_argument("--size", type=int, default=128, help="image side in px")
    s.add_argument("--no-trouble", action="store_true", help="no planted duplicates/corrupt files/label problems")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("isic-server", help="serve an ISIC-style folder over the ISIC API v2 (offline)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", help="folder with images + metadata.csv")
    where.add_argument("--root", dest="images_root", help=argparse.SUPPRESS)  # deprecated name of --images
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8765)
    s.add_argument("--latency-ms", type=float, default=0.0)
    s.add_argument("--fail-rate", type=float, default=0.0, help="share of requests answered 5xx")
    s.add_argument("--rate-limit-every", type=int, default=0, help="every K-th request gets 429 + Retry-After")
    s.add_argument("--truncate-rate", type=float, default=0.0, help="share of file bodies cut short")
    s.add_argument("--seed", type=int, default=0, help="seed of the fault injector")
    s.set_defaults(func=cmd_isic_server)

    s = sub.add_parser("run", help="run the dvc.yaml stages as a Prefect flow (DVC skips what is up to date)")
    s.add_argument("--executor", choices=["dvc", "inprocess"], default="dvc",
                   help="dvc: `dvc repro --single-item` per stage (default); inprocess: call run() directly")
    s.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (still in dvc.yaml order)")
    s.add_argument("--force", action="store_true", help="rerun even if up to date (dvc repro --force)")
    s.add_argument("--force-prune", action="store_true",
                   help=force_prune_help + "; ingest must run: add --force if DVC finds it up to date")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="the whole DAG on the embedded synthetic source, then promote; says where to look")
    s.add_argument("--executor", choices=["dvc", "inprocess"], default=None,
                   help="default: dvc in a git+DVC checkout, else inprocess")
    s.add_argument("--no-promote", action="store_true", help="skip the promotion gate")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("nightly", help="one nightly run now: refresh, reproduce if stale, gate the champion")
    s.add_argument("--config", default="nightly.yaml")
    s.add_argument("--force-prune", action="store_true", help=force_prune_help)
    s.set_defaults(func=cmd_nightly)

    s = sub.add_parser("deploy",
                       help="serve the nightly (cron) and pipeline deployments (needs `prefect server start`)")
    s.add_argument("--config", default="nightly.yaml")
    s.add_argument("--pool", help="register on this work pool instead of serving (then: prefect worker start --pool P)")
    s.add_argument("--gpu-limit", type=_positive_int, default=1,
                   help="slots of the `gpu` concurrency limit (created if absent)")
    s.add_argument("--dry-run", action="store_true", help="print the deployments and schedules; no server needed")
    s.set_defaults(func=cmd_deploy)

    s = sub.add_parser("ui", help="open the MLflow UI over mlruns/ (prints the command)")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--dry-run", action="store_true", help="only print the command")
    s.set_defaults(func=cmd_ui)

    s = sub.add_parser("promote", help="gate a model version against the champion now (or --force a rollback)")
    s.add_argument("--config", default="nightly.yaml")
    s.add_argument("--version", help="model version (default: the one built from the current pipeline outputs)")
    s.add_argument("--force", action="store_true", help="make --version champion without comparing (logged)")
    s.set_defaults(func=cmd_promote)

    s = sub.add_parser("predict", help="score image files/folders with a model (path, runs:/ or models:/ URI)")
    s.add_argument("--model", default="models",
                   help="models/ folder, a .keras file, runs:/ID/model or models:/lesionflow-classifier@champion")
    s.add_argument("--out", required=True, help="CSV: isic_id, path, probability_malignant, prediction, error")
    s.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="refuse images larger than this (default: the model's preprocess.max_pixels)")
    s.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("screen", help="find lesions in wide-field photos, score them, rank the ugly duckling")
    s.add_argument("images", nargs="+", help="wide-field photos")
    s.add_argument("--out", required=True, help="folder for <stem>_screen.png (annotated) and <stem>_screen.csv")
    s.add_argument("--model", default="models",
                   help="models/ folder, .keras file or runs:/ models:/ URI; 'none' = ranks from hand-made features")
    s.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="refuse photos larger than this (default: the model's preprocess.max_pixels)")
    s.set_defaults(func=cmd_screen)

    s = sub.add_parser("synth-widefield", help="write synthetic wide-field photos (one odd lesion) + truth JSON")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth_widefield)

    s = sub.add_parser("serve", help="REST scoring server for a registered model (mlflow models serve)")
    s.add_argument("--model", default="models:/lesionflow-classifier@champion")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=5001)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("tune", help="hyperparameter search (Optuna) over train/augment params; trials are MLflow child "
                                    "runs")
    s.add_argument("--trials", type=_positive_int, default=None,
                   help="finished trials the study should hold (default: tune.n_trials; a rerun runs the missing ones)")
    s.add_argument("--timeout", type=float, default=None,
                   help="start no new trial after this many seconds (default: tune.timeout_s)")
    s.add_argument("--apply", action="store_true",
                   help="write the best trial's values into the params file (in place, comments kept)")
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("card", help="print the model card of a registered version or an evaluate run")
    s.add_argument("model_uri", metavar="MODEL_URI",
                   help="models:/lesionflow-classifier@champion, models:/lesionflow-classifier/3 or runs:/RUN_ID")
    s.set_defaults(func=cmd_card)

    s = sub.add_parser("drift", help="drift report now: current data vs the champion's (or --version V) training data")
    s.add_argument("--config", default="nightly.yaml")
    s.add_argument("--version", default=None, help="compare with this version instead of the champion")
    s.set_defaults(func=cmd_drift)

    s = sub.add_parser("app", help="web page + JSON API: score photos (Grad-CAM), rank wide-field lesions (FastAPI)")
    s.add_argument("--model", default="models:/lesionflow-classifier@champion",
                   help="models:/ or runs:/ URI, a models/ folder or a .keras file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-files", type=int, default=16, help="photos per request")
    s.add_argument("--max-file-mb", type=float, default=20.0, help="MiB per photo")
    s.add_argument("--max-pixels", type=int, default=None, help="pixel cap (default: the model's stored cap)")
    s.add_argument("--keep", default=None, metavar="DIR", help="keep uploads + answers here (default: nothing kept)")
    s.set_defaults(func=cmd_app)

    from flows import stack  # light: no prefect/mlflow/boto3 at import

    stack.add_parser(sub)  # `stack up|down|status|env`: shared services for a team trial (docs/scaling.md)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, turn any failure into one `error:` line and an exit status (see the docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        args.debug = debug = debug or args.debug
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    raise SystemExit(main())
