"""`lesionflow`: the one console script (what dvc.yaml, people and the flows call)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

# Telemetry/update checks off before any library is imported (no network here, and none wanted in CI).
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
}.items():
    os.environ.setdefault(_k, _v)


def _emit(obj: object) -> None:
    """A command's result as stable JSON on stdout (what scripts and the flows parse)."""
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _load(args: argparse.Namespace):
    from tasks.core.config import ParamsError, load_params

    try:
        return load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_params(args: argparse.Namespace) -> int:
    from tasks.core.config import dump_params

    print(dump_params(_load(args)), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from flows.stages import get
    from tasks.core.io import Paths

    stage = get(args.name)
    params = _load(args)  # validated before any work starts
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

    serve_forever(Path(args.root), host=args.host, port=args.port, latency_ms=args.latency_ms,
                  fail_rate=args.fail_rate, rate_limit_every=args.rate_limit_every,
                  truncate_rate=args.truncate_rate, seed=args.seed)
    return 0


# --------------------------------------------------------------------------- orchestration (flows/*.py)
def cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import PipelineError, format_results, pipeline_flow, plan

    try:
        plan(Path(args.root), args.stages or None)  # config errors surface before Prefect starts its engine
        results = pipeline_flow(root=args.root, params=args.params, executor=args.executor,
                                stages=args.stages or None, force=args.force)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_results(results))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.pipeline import demo

    demo(Path(args.root), executor=args.executor, promote=not args.no_promote)
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from flows.nightly import nightly_flow

    rec = nightly_flow(root=args.root, config=args.config, params=args.params)
    _emit(rec)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows import deploy

    root = Path(args.root).resolve()
    if args.dry_run:
        print(deploy.describe(root, args.config))
    elif args.pool:
        deploy.deploy_to_pool(root, args.pool, args.config, args.gpu_limit)
    else:
        deploy.serve(root, args.config, args.gpu_limit)
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
    from flows.nightly import load_nightly, promote_now

    root = Path(args.root).resolve()
    rec = promote_now(root, load_nightly(root / args.config), root / args.params, version=args.version,
                      force=args.force)
    _emit(rec)
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    from tasks.screen import screen_files

    summary = screen_files(args.images, args.out, args.model, root=Path(args.root).resolve())
    _emit(summary)
    return 0


def cmd_synth_widefield(args: argparse.Namespace) -> int:
    from tasks.screen import synth_widefield

    files = synth_widefield(args.out, args.n, args.seed)
    _emit({"images": len(files), "out": str(args.out)})
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tasks.predict import predict

    summary = predict(args.model, args.inputs, args.out, root=Path(args.root).resolve())
    _emit(summary)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.tracking import serve

    return serve(args.model, Path(args.root).resolve(), host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lesionflow", description=__doc__)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--root", default=".", help="project root holding data/ (default: .)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("params", help="print the validated params (defaults filled in)")
    s.set_defaults(func=cmd_params)

    s = sub.add_parser("stage", help="run one pipeline stage (what dvc.yaml calls)")
    s.add_argument("name")
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
    s.add_argument("--root", dest="root", required=True, help="folder with images + metadata.csv")
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
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("demo", help="the whole DAG on the embedded synthetic source, then promote; says where to look")
    s.add_argument("--executor", choices=["dvc", "inprocess"], default=None,
                   help="default: dvc in a git+DVC checkout, else inprocess")
    s.add_argument("--no-promote", action="store_true", help="skip the promotion gate")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("nightly", help="one nightly run now: refresh, reproduce if stale, gate the champion")
    s.add_argument("--config", default="nightly.yaml")
    s.set_defaults(func=cmd_nightly)

    s = sub.add_parser("deploy", help="serve the nightly (cron) and pipeline deployments (needs `prefect server start`)")
    s.add_argument("--config", default="nightly.yaml")
    s.add_argument("--pool", help="register on this work pool instead of serving (then: prefect worker start --pool P)")
    s.add_argument("--gpu-limit", type=int, default=1, help="slots of the `gpu` concurrency limit (created if absent)")
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
    s.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("screen", help="find lesions in wide-field photos, score them, rank the ugly duckling")
    s.add_argument("images", nargs="+", help="wide-field photos")
    s.add_argument("--out", required=True, help="folder for <stem>_screen.png (annotated) and <stem>_screen.csv")
    s.add_argument("--model", default="models",
                   help="models/ folder, .keras file or runs:/ models:/ URI; 'none' = ranks from hand-made features")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    raise SystemExit(main())
