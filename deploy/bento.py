"""Build the bento and its container payload without a network or a Docker engine.

    python deploy/bento.py build --bundle artifacts/bundle [--split artifacts/bundle-split] [--flavour cpu|gpu] [--tag-file F]
    python deploy/bento.py containerfile --tag fusion_serve:<version> --out artifacts/container/Dockerfile
    python deploy/bento.py context --tag fusion_serve:<version> --out artifacts/container/context

`build` checks the bundle (every sha256, as the service will), stages exactly the files the
flavour's bentofile names into a build directory (the bundle always lands at artifacts/bundle, so
any bundle directory can be packaged), and runs `bentoml build` there. The bento version is
`<bundle_version>-<digest of everything staged>`: the served bundle is visible in the bento tag and
so in the default image tag, and building the same inputs twice reuses the bento.
`--split DIR` also packages the split layout of `fusion build --split` / `fusion split` (issue 19):
split.json, the front bundle and every member bundle, each checked like the bundle (every sha256 and
its version against split.json's), at artifacts/bundle-split, where deploy/overlays/split points.

`containerfile` writes the Dockerfile `bentoml containerize` uses (bentoml.container.get_containerfile).

`context` runs `bentoml containerize` with a stand-in `docker` on PATH that answers `version` and
copies the build context it is handed instead of building: the exact payload an image would get
(Dockerfile, bento, models), which `bentoml serve <context>` can then serve.

`image` is `bentoml containerize` for real (it needs a Docker engine), tagged <image>:<bento
version> and <image>:latest. `smoke` serves a captured context from an empty BENTOML_HOME, with the
image's environment (paths mapped into the context), and runs deploy/smoke.sh against it.

BentoML uses $BENTOML_HOME (default ~/bentoml) as its store, here as everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENTOFILES = {"cpu": "bentofile.yaml", "gpu": "deploy/bentofile.gpu.yaml"}
# staged besides the bentofile and the bundle; the bentofiles' `include:` lists select from these
SOURCES = ("service", "fusion/__init__.py", "fusion/errors.py", "fusion/bundle.py", "fusion/stats.py",
           "fusion/sequential.py", "fusion/combine.py",
           "deploy/healthcheck.py", "deploy/Dockerfile.template",
           "deploy/requirements.lock.txt", "deploy/requirements.gpu.lock.txt")  # the bentofiles' requirements_txt
BUNDLE_DEST = "artifacts/bundle"  # where the bentofiles expect the bundle, relative to the context
SPLIT_DEST = "artifacts/bundle-split"  # the split layout (deploy/overlays/split's FUSION_BUNDLE paths)
SPLIT_LAYOUT = "split.json"  # fusion.split.LAYOUT (fusion/split.py imports the bundle writer; read it as JSON here)
STAGE_MARKER = ".fusion-bento-stage"

STANDIN_DOCKER = """#!/usr/bin/env bash
# Stand-in for the docker CLI (written by deploy/bento.py): `bentoml containerize` asks for the
# server version, then runs `docker build ... <context>`; this copies <context> instead of building.
set -euo pipefail
case "${1:-}" in
  version) echo '"27.5.1"' ;;
  build)
    ctx="${!#}"
    mkdir -p "$FUSION_CAPTURE_DIR"
    cp -a "$ctx"/. "$FUSION_CAPTURE_DIR"/
    echo "stand-in docker: docker $* -> captured the build context in $FUSION_CAPTURE_DIR" ;;
  *) echo "stand-in docker: unsupported command: $*" >&2; exit 1 ;;
esac
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    if env.get("BENTOML_HOME"):  # the subprocesses run elsewhere
        env["BENTOML_HOME"] = str(Path(env["BENTOML_HOME"]).expanduser().resolve())
    return env


def _bentoml(*args: str, env: dict[str, str] | None = None, capture: bool = False, cwd: Path | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "bentoml", *args], env=env or _env(), text=True, cwd=cwd,
                          stdout=subprocess.PIPE if capture else None, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bentoml {' '.join(args)} failed with exit code {proc.returncode}")
    return proc.stdout or ""


def bundle_files(bundle: Path, check_version: bool = False) -> tuple[str, list[str]]:
    """(bundle_version, files relative to the bundle) after verifying every file's sha256.
    A split front's remote members and combined ensemble have no file (they are served elsewhere)."""
    sys.path.insert(0, str(ROOT))
    from fusion.bundle import MANIFEST, read_bundle  # torch-free

    checked = read_bundle(bundle, check_version=check_version)
    files = [MANIFEST, *sorted({e.file for e in checked.manifest.entries().values() if e.file} | set(checked.manifest.files))]
    return checked.manifest.bundle_version, files


def split_files(split: Path) -> list[str]:
    """Files of a split layout relative to its directory (split.json, front/..., members/<host>/...), after
    checking every bundle it names: every sha256, its version recomputed, and that version equal to the one
    split.json recorded (a front and members from different splits would disagree at the first request)."""
    import json

    try:
        layout = json.loads((split / SPLIT_LAYOUT).read_text())
        bundles = {"front": (layout["front"], layout["front_version"]),
                   **{f"member '{n}'": (m["bundle"], m["bundle_version"]) for n, m in layout["members"].items()}}
    except FileNotFoundError:
        raise SystemExit(f"{split}: expected a split layout with {SPLIT_LAYOUT} (`fusion build --split` or "
                         f"`fusion split`); got no {SPLIT_LAYOUT}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"{split / SPLIT_LAYOUT}: expected front, front_version and members with bundle and "
                         f"bundle_version each; got an unreadable layout ({type(exc).__name__}: {exc})") from None
    if not layout["members"]:
        raise SystemExit(f"{split / SPLIT_LAYOUT}: expected at least one member; got none")
    files = [SPLIT_LAYOUT]
    for what, (rel, want) in bundles.items():
        path = (split / rel).resolve()
        if not path.is_relative_to(split.resolve()):
            raise SystemExit(f"{split / SPLIT_LAYOUT}: {what}'s bundle expected inside {split}; got {rel!r}")
        version, names = bundle_files(path, check_version=True)
        if version != want:
            raise SystemExit(f"{path}: {what}: expected bundle version {want} (as {SPLIT_LAYOUT} records); got {version}")
        files += [f"{Path(rel).as_posix()}/{name}" for name in names]
    return files


def stage(bundle: Path, flavour: str, out: Path, split: Path | None = None) -> tuple[Path, str, str]:
    """Copy the sources, the bentofile and the checked bundle (and split layout) into `out`;
    (bentofile, bundle_version, digest). Everything is checked before anything is staged."""
    version, files = bundle_files(bundle)
    split_rel = split_files(split) if split is not None else []
    if out.exists():
        if any(out.iterdir()) and not (out / STAGE_MARKER).is_file():
            raise SystemExit(f"{out} is not empty and is not a staging directory of deploy/bento.py: not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / STAGE_MARKER).write_text("staged by deploy/bento.py; deleted and rebuilt by each build\n")
    for rel in SOURCES:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, out / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out / rel)
    bentofile = out / BENTOFILES[flavour]
    bentofile.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / BENTOFILES[flavour], bentofile)
    for rel in files:
        dest = out / BUNDLE_DEST / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle / rel, dest)
    for rel in split_rel:
        dest = out / SPLIT_DEST / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(split / rel, dest)
    h = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(out).as_posix()}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return bentofile, version, h.hexdigest()


def existing(tag: str) -> bool:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        bentoml.bentos.get(tag)
        return True
    except NotFound:
        return False


def bento_name(bentofile: Path) -> str:
    import yaml

    return yaml.safe_load(bentofile.read_text())["name"]


def cmd_build(args: argparse.Namespace) -> str:
    work = Path(args.stage or ROOT / "artifacts/container" / f"stage-{args.flavour}").resolve()
    bentofile, bundle_version, digest = stage(Path(args.bundle), args.flavour, work,
                                              Path(args.split) if args.split else None)
    tag = f"{bento_name(bentofile)}:{bundle_version}-{digest[:10]}"
    if existing(tag):
        print(f"bento {tag} already built from the same inputs", file=sys.stderr)
    else:
        # run in the context: BentoML refuses a dockerfile_template outside the working directory
        out = _bentoml("build", "-f", str(bentofile.relative_to(work)), "--version", tag.split(":")[1],
                       "--label", f"bundle_version={bundle_version}", "--label", f"source_digest={digest}",
                       "-o", "tag", ".", capture=True, cwd=work)
        built = [ln.split("__tag__:", 1)[1] for ln in out.splitlines() if ln.startswith("__tag__:")]
        if built != [tag]:
            raise SystemExit(f"expected bentoml build to report {tag}; got {out!r}")
    if args.tag_file:
        Path(args.tag_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.tag_file).write_text(tag + "\n")
    print(tag)
    return tag


# BentoML 1.4.40 re-renders a bento's dockerfile_template inside a temporary copy of the bento and
# refuses it unless that copy is under the working directory (bentoml/BentoML#5566, open):
# containerize and get_containerfile must run with the temporary directory's root as cwd.
WORKAROUND_CWD = Path(tempfile.gettempdir()).resolve()


def cmd_containerfile(args: argparse.Namespace) -> None:
    import bentoml

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(WORKAROUND_CWD)
    try:
        bentoml.container.get_containerfile(args.tag, output_path=str(out))
    finally:
        os.chdir(cwd)
    print(out)


def cmd_context(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    if out.exists():
        if any(out.iterdir()) and not (out / "bento.yaml").is_file():
            raise SystemExit(f"{out} is not empty and is not a captured context: not deleting it")
        # a previous capture is read-only (see --read-only); make it removable first
        for p in [out, *out.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory(prefix="standin-docker-") as bindir:
        docker = Path(bindir) / "docker"
        docker.write_text(STANDIN_DOCKER)
        docker.chmod(0o755)
        env = {**_env(), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
               "FUSION_CAPTURE_DIR": str(out)}
        extra = ["--image-tag", args.image_tag] if args.image_tag else []
        _bentoml("containerize", args.tag, "--backend", "docker", *extra, env=env, cwd=WORKAROUND_CWD)
    if not (out / "env/docker/Dockerfile").is_file():
        raise SystemExit(f"no build context was captured in {out}")
    if args.read_only:  # files as in the image (`chmod -R a-w,a+rX`); folders stay removable (`make clean`)
        for p in [*out.rglob("*"), out]:
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            p.chmod(0o755 if p.is_dir() else (mode & ~0o222 | 0o444) | (0o111 if mode & 0o111 else 0))
    print(out)


def cmd_image(args: argparse.Namespace) -> None:
    version = args.tag.split(":", 1)[1]
    tags = [f"{args.image}:{version}", f"{args.image}:latest"]
    _bentoml("containerize", args.tag, *(a for t in tags for a in ("--image-tag", t)), cwd=WORKAROUND_CWD)
    print("\n".join(tags))


IMAGE_BENTO_PATH = "/home/bentoml/bento"  # BENTO_PATH in BentoML's generated Dockerfile


def container_env(context: Path) -> dict[str, str]:
    """The environment the image sets (bento.yaml's envs), with paths inside the image mapped into `context`."""
    import yaml

    info = yaml.safe_load((context / "bento.yaml").read_text())
    env = {e["name"]: str(e.get("value", "")) for e in info.get("envs") or []}
    return {k: str(context) + v[len(IMAGE_BENTO_PATH):] if v.startswith(IMAGE_BENTO_PATH + "/") else v
            for k, v in env.items()}


def cmd_smoke(args: argparse.Namespace) -> None:
    context = Path(args.context).resolve()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bentoml-home-") as home:
        env = {**_env(), **container_env(context), "BENTOML_HOME": home, "ORT_DISABLE_TELEMETRY": "1"}
        print(f"serving {context} from an empty BENTOML_HOME on port {port}", file=sys.stderr)
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", str(context), "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, cwd=WORKAROUND_CWD, start_new_session=True)
        try:
            rc = subprocess.call(["bash", str(ROOT / "deploy/smoke.sh"), f"http://127.0.0.1:{port}"],
                                 env={**os.environ, "SMOKE_READY_TIMEOUT": "90"})
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    if rc:
        raise SystemExit(rc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="stage the bundle and build the bento (offline)")
    b.add_argument("--bundle", default="artifacts/bundle")
    b.add_argument("--split", help="also package this split layout (`fusion build --split DIR`) at " + SPLIT_DEST)
    b.add_argument("--flavour", choices=sorted(BENTOFILES), default="cpu")
    b.add_argument("--stage", help="build directory (default artifacts/container/stage-<flavour>)")
    b.add_argument("--tag-file", help="write the bento tag to this file")
    c = sub.add_parser("containerfile", help="write the Dockerfile `bentoml containerize` uses")
    c.add_argument("--tag", required=True)
    c.add_argument("--out", required=True)
    x = sub.add_parser("context", help="capture the full container build context without an engine")
    x.add_argument("--tag", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--image-tag", help="image tag passed to containerize (default: the bento tag)")
    x.add_argument("--read-only", action="store_true",
                   help="make the captured files read-only for everyone, as the image makes the bento")
    i = sub.add_parser("image", help="bentoml containerize, tagged <image>:<bento version> and :latest (needs Docker)")
    i.add_argument("--tag", required=True)
    i.add_argument("--image", required=True, help="image name, e.g. fusion-serve or registry.example.com/fusion-serve")
    m = sub.add_parser("smoke", help="serve a captured context from an empty BENTOML_HOME and run deploy/smoke.sh")
    m.add_argument("--context", required=True)
    args = ap.parse_args(argv)
    commands = {"build": cmd_build, "containerfile": cmd_containerfile, "context": cmd_context,
                "image": cmd_image, "smoke": cmd_smoke}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
