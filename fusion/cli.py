"""`fusion` command: a thin shell over the library. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fusion.errors import FusionError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,2,1; got '{text}'") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 5}}'; got {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 5}}'; got {type(value).__name__}")
    return value


WEIGHT_MODES = ("auto", "equal", "select", "fit")  # fusion.recipe.WEIGHT_MODES (the parser imports nothing heavy)


def _member_weights(text: str) -> list[float] | dict[str, float] | str:
    """`--weights`: auto | equal | select | fit, numbers, one per member in member order (1,1,2), or name=weight
    pairs (mlp_0=2,cnn_1=3)."""
    if text.strip() in WEIGHT_MODES:
        return text.strip()
    items = [v.strip() for v in text.split(",") if v.strip()]
    named = ["=" in v for v in items]
    if any(named) and not all(named):
        raise argparse.ArgumentTypeError(f"expected numbers (1,1,2) or name=weight pairs (mlp_0=2,cnn_1=3), not a mix; got '{text}'")
    if not any(named):
        return _floats(text)
    out: dict[str, float] = {}
    for item in items:
        name, _, value = (part.strip() for part in item.partition("="))
        try:
            if not name:
                raise ValueError
            w = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers like 1,2,1 or name=weight pairs like mlp_0=2,cnn_1=3; got '{text}'") from None
        if name in out:
            raise argparse.ArgumentTypeError(f"expected each member once; got {name} twice in '{text}'")
        out[name] = w
    return out


WEIGHTS_HELP = (
    "member weights: auto (the default: equal, select, fit, each also with a fitted output temperature, or "
    "stacking, whichever has the lowest out-of-fold validation NLL), equal, select (ensemble selection, Caruana et al. 2004), fit (simplex weights minimising "
    "the validation NLL); or by name: mlp_0=2,cnn_1=3 (the other members weigh 1); or one number per member in member "
    "order: the recipe's [zoo] members when it lists them, else the zoo's checkpoint names sorted (the default "
    "zoo: cnn_0, cnn_1, cnn_2, mlp_0, mlp_1, mlp_2, mlp_3, mlp_4, so 1,1,1,2,2,2,2,2 doubles the MLPs). "
    "The manifest's variants.ensemble.members lists that order"
)


def merge_method_names() -> list[str]:
    """The merge registry's names, in registration order (`fusion merge --method`)."""
    from fusion.merge import names

    return names()


def combiner_names() -> list[str]:
    """The combiner registry's names, in registration order (`fusion build --combiner`)."""
    from fusion.ensemble import COMBINERS

    return list(COMBINERS)


class _RegistryNames(argparse.Action):
    """Stores a name whose help lists a registry's names, read only when help is printed: the registries
    import torch, and building the parser must not. The choices are not enforced here: an unknown name
    reaches the library, whose one-line error lists the valid names (exit 2, like every other error)."""

    def __init__(self, option_strings, dest, names, **kwargs):
        self.names = names
        super().__init__(option_strings, dest, **kwargs)

    @property
    def help(self) -> str:
        return " | ".join(self.names())

    @help.setter
    def help(self, value) -> None:  # argparse assigns help=None; the names are the help
        pass

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def cmd_zoo(args) -> int:
    from fusion.data import load
    from fusion.zoo import TrainConfig, ZooConfig, train_zoo

    data = load(args.data) if args.data == "digits" else load(args.data, label_column=args.label_column)
    cfg = ZooConfig(n_mlp=args.n_mlp, n_cnn=args.n_cnn, seed=args.seed, train=TrainConfig(epochs=args.epochs),
                    cnn_shift_copies=args.cnn_shift_copies)
    out = Path(args.out) / args.scenario
    if args.scenario in ("swa", "snapshots"):
        return _zoo_trajectory(args, data, out)
    if args.scenario == "independent":
        specs = train_zoo(data, out, cfg)
    else:
        from fusion.zoo import train_shared_base_zoo

        specs = train_shared_base_zoo(data, out, cfg)
    for s in sorted(specs, key=lambda s: s.name):  # member order: what `fusion build --weights 1,2,...` follows
        print(f"{s.name:12s} {s.arch:4s} seed={s.seed:<5d} val={s.metrics['val_accuracy']:.4f} test={s.metrics['test_accuracy']:.4f}")
    print(f"wrote {len(specs)} checkpoints to {out}, listed by name: the member order of `fusion build --weights 1,2,...`")
    return 0


def _zoo_trajectory(args, data, out: Path) -> int:
    """`fusion zoo --scenario swa | snapshots`; when the other of the two sits beside it with the same budget,
    prints SWA (one model) against the snapshot ensemble (K models) on the test split."""
    from fusion.trajectory import TRAJECTORY_FILE, TrajectoryConfig, compare_trajectories, train_snapshots, train_swa, trajectory_table

    cfg = TrajectoryConfig(epochs=args.epochs, n_cycles=args.n_cycles, seed=args.seed)
    specs, info = (train_swa if args.scenario == "swa" else train_snapshots)(data, out, cfg)
    for s in specs:
        print(f"{s.name:12s} {s.arch:4s} seed={s.seed:<5d} val={s.metrics['val_accuracy']:.4f} test={s.metrics['test_accuracy']:.4f}")
    print(f"wrote {len(specs)} checkpoints and {TRAJECTORY_FILE} to {out} ({info['epochs']} SGD epochs, {info['arch']})")
    other = out.parent / ("snapshots" if args.scenario == "swa" else "swa")
    if (other / TRAJECTORY_FILE).is_file():
        dirs = (out, other) if args.scenario == "swa" else (other, out)
        try:
            print(trajectory_table(compare_trajectories(*dirs, data)))
        except FusionError as exc:
            print(f"(no SWA vs snapshot comparison: {exc})")
    return 0


SPLIT_URL_TEMPLATE = "http://member-{host}:3000/v2/models/{name}"  # fusion.split.DEFAULT_URL_TEMPLATE (torch-free import)


def cmd_build(args) -> int:
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe, override

    recipe = load_recipe(args.recipe)
    weights = args.weights if isinstance(args.weights, (dict, str)) else tuple(args.weights) if args.weights else None
    recipe = override(recipe, "ensemble", combiner=args.combiner, weights=weights)
    recipe = override(recipe, "zoo", dir=args.zoo)
    recipe = override(recipe, "build", out=args.out)
    # `--split [DIR]` is the recipe's `[serve] split = true` (and `split_dir = DIR`): either writes the split layout
    recipe = override(recipe, "serve", split=True if args.split is not None else None, split_dir=args.split or None,
                      url_template=args.url_template)
    manifest = build_bundle(recipe)
    print(f"bundle {manifest.bundle_version} written to {recipe.build.out}")
    for name, v in manifest.entries().items():
        acc = v.metrics.get("test_accuracy")
        figure = f"test accuracy {acc:.4f}" if acc is not None else "no data set: no accuracy"
        print(f"  {name:14s} {v.kind:9s} {figure}  {v.file}")
    ens = manifest.variants["ensemble"]
    weights = (ens.combiner or {}).get("weights") or [1.0] * len(ens.members)
    print("  weights by member: " + ", ".join(f"{n}={w:g}" for n, w in zip(ens.members, weights)))
    sel = manifest.ensemble_selection
    if sel:
        figures = ", ".join(f"{n} {c['val_oof']['nll']:.4f}" for n, c in sel["candidates"].items())
        print(f"  weights '{sel['weights']}': {sel['chosen']} ({sel['combiner']}); out-of-fold validation NLL: {figures}")
        if sel["gate"]["warning"]:
            print(f"fusion build: warning: {sel['gate']['warning']}", file=sys.stderr)
    if manifest.comparison:
        print(f"comparison: {Path(recipe.build.out) / 'comparison.md'} (and .json, .png)")
    if recipe.serve.split:  # issue 19: the same bundle, also as a front + one bundle per member
        _print_split(recipe.build.out, recipe.serve.split_dir or f"{recipe.build.out}-split", recipe.serve.url_template)
    return 0


def _print_split(bundle: str, out: str, url_template: str) -> None:
    from fusion.split import split_bundle

    layout = split_bundle(bundle, out, url_template)
    print(f"split layout written to {out}: front {layout['front_version']} ({Path(out) / 'front'}), members:")
    for name, m in layout["members"].items():
        print(f"  {name:14s} {m['bundle_version']}  {Path(out) / m['bundle']}  served at {m['url']}")


def cmd_split(args) -> int:
    _print_split(args.bundle, args.out or f"{args.bundle.rstrip('/')}-split", args.url_template)
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 256,256; got '{text}'") from None


def cmd_distill(args) -> int:
    from fusion.build import build_ensemble, ensure_zoo, load_data
    from fusion.distill import distill, save_student, teacher_from_bundle
    from fusion.recipe import load_recipe, override

    recipe = override(load_recipe(args.recipe), "zoo", dir=args.zoo)
    cfg = override(recipe, "distill", arch=args.arch, hidden=tuple(args.hidden) if args.hidden else None,
                   epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, seed=args.seed).distill
    data = load_data(recipe)
    if args.bundle:
        teacher, source = teacher_from_bundle(args.bundle, args.teacher), f"{args.bundle}:{args.teacher}"
    else:
        teacher, source = build_ensemble(recipe, ensure_zoo(recipe, data), data), f"{recipe.zoo.dir}:ensemble"
    student, history = distill(teacher, data, cfg)
    paths = save_student(student, data, cfg, history, args.out, name=args.name, teacher=source, onnx=args.onnx)
    print(f"student {args.name}: best epoch {history.best_epoch}/{history.epochs_run}, validation agreement "
          f"{history.best_val_agreement:.4f}, accuracy {history.student_val_accuracy:.4f} "
          f"(teacher {history.teacher_val_accuracy:.4f})")
    for kind, path in paths.items():
        print(f"  {kind:11s} {path}")
    return 0


def cmd_compare(args) -> int:
    from fusion.bundle import read_bundle
    from fusion.compare import CompareConfig, compare_models, to_markdown, write_report
    from fusion.data import load
    from fusion.errors import ConfigError

    bundle = read_bundle(args.bundle)
    source = args.data or bundle.manifest.dataset.get("source") or bundle.manifest.dataset.get("name", "digits")
    if source != "digits" and not Path(source).is_file():
        raise ConfigError(f"the bundle was built on '{source}'; pass its file with --data")
    if bundle.manifest.inputs:  # named inputs (issue 15): one array per input in the .npz, plus y
        from fusion.data import load_named

        data = load_named(source, bundle.manifest.inputs, task=bundle.manifest.task)
    else:
        data = load(source) if source == "digits" else load(source, label_column=args.label_column)
    report = compare_models(bundle.path, bundle.manifest, data, CompareConfig(split=args.split, rounds=args.rounds))
    print(to_markdown(report), end="")
    if args.out_dir:
        for path in write_report(report, args.out_dir).values():
            print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from fusion.report import write_report

    print(f"wrote {write_report(args.bundle, args.out)}")
    return 0


def cmd_verify(args) -> int:
    from fusion.bundle import read_bundle

    b = read_bundle(args.bundle)
    print(json.dumps({"bundle_version": b.manifest.bundle_version, "files_verified": len(b.manifest.entries())}))
    return 0


def _data(args):
    from fusion.data import load

    src = getattr(args, "data", None) or "digits"
    return load(src) if src == "digits" else load(src, label_column=getattr(args, "label_column", "label"))


def _merge_config(args) -> int:
    """`fusion merge --config merge.yml --out DIR`: a mergekit YAML config (fusion.merge.mergekit_config)."""
    from fusion.errors import ConfigError
    from fusion.merge.mergekit_config import load_config, run_plan

    clash = [flag for flag, value in (("--method", args.method), ("--models", args.models), ("--base", args.base),
                                      ("--weights", args.weights), ("--param", args.param), ("--arch", args.arch),
                                      ("--dtype", args.dtype)) if value]
    if clash:
        raise ConfigError(f"--config takes the method, models, base, parameters and dtype (out_dtype) from the YAML; "
                          f"expected none of {clash} next to it")
    res = run_plan(load_config(args.config), args.out, max_shard_bytes=args.max_shard_size)
    print(f"merged {res['n_models']} models with mergekit's '{res['method']}' ({res['entries']} tensors, "
          f"{len(res['files'])} file(s)) -> {args.out}")
    return 0


def cmd_merge(args) -> int:
    from fusion.fuse import merge_checkpoints, parse_params

    if args.config:
        return _merge_config(args)
    if not args.method or not args.models:
        from fusion.errors import ConfigError

        raise ConfigError(f"fusion merge: expected --method and --models (or --config merge.yml); got "
                          f"{'no --method' if not args.method else 'no --models'}")

    from fusion.fuse import has_spec

    inputs = [*args.models, *([args.base] if args.base else [])]
    model_known = bool(args.arch) or (has_spec(args.models[0]) and not any(Path(p).is_dir() for p in inputs))
    data = _data(args) if args.data != "none" and model_known else None  # metrics need a model to run
    res = merge_checkpoints(args.method, args.models, args.out, base=args.base, weights=args.weights,
                            params=parse_params(args.param), arch=args.arch, data=data,
                            dtype=args.dtype, max_shard_size=args.max_shard_size)
    how = "streamed tensor by tensor" if res["streamed"] else "in memory"
    what = f", architecture-free, {len(res['files'])} file(s)" if res.get("arch_free") else ""
    print(f"merged {len(args.models)} checkpoints with '{args.method}' ({how}{what}) -> {args.out}")
    if res.get("arch_free"):
        from fusion.merge import open_checkpoint

        bn = [k for k in open_checkpoint(args.models[0]).keys() if k.endswith((".running_mean", ".running_var"))]
        if bn:  # averaged like weights: a merged network's activations have other statistics
            print(f"  note: {len(bn)} BatchNorm running statistics (e.g. {bn[0]}) were merged like weights, not recomputed "
                  f"(no architecture to run: no spec, no --arch). Recompute them on data before serving, e.g. "
                  f"torch.optim.swa_utils.update_bn(loader, model) on the merged model; merging without it can "
                  f"cost most of the accuracy")
    if res["metrics"]:
        print(f"  val accuracy {res['metrics']['val_accuracy']:.4f}, test accuracy {res['metrics']['test_accuracy']:.4f}")
    return 0


def cmd_align(args) -> int:
    from fusion.fuse import align_checkpoints

    source = getattr(args, "source", None)
    data = None if source and args.method == "weight_matching" else _data(args)  # a source's weight matching needs no data
    for r in align_checkpoints(args.method, args.reference, args.models, args.out_dir, arch=args.arch, data=data, seed=args.seed,
                               source=source, source_args=args.args, input_shape=args.input_shape):
        if source:
            print(f"{r['model']} -> {r['out']} ({r['permutations']} permutations from the torch.fx spec of {source}; same function)")
        else:
            print(f"{r['model']} -> {r['out']} (test accuracy {r['metrics'].get('test_accuracy', float('nan')):.4f}, unchanged by a permutation)")
    return 0


def cmd_barrier(args) -> int:
    from fusion.fuse import barrier_report

    rep = barrier_report(args.a, args.b, _data(args), arch=args.arch, align=args.align, n_points=args.points,
                         json_out=args.json, plot_out=args.plot)
    print(f"loss barrier ({rep['barrier_convention']}, test split):")
    for name, p in rep["paths"].items():
        mid = p["accuracy"][len(p["accuracy"]) // 2] if p["accuracy"] else float("nan")
        print(f"  {name:16s} barrier {p['barrier']:.4f}   midpoint accuracy {mid:.4f}   endpoints {p['accuracy'][0]:.4f} / {p['accuracy'][-1]:.4f}")
    for out in (args.json, args.plot):
        if out:
            print(f"wrote {out}")
    return 0


def cmd_recipe_schema(args) -> int:
    from fusion.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def cmd_convert_weights(args) -> int:
    from fusion.sources import convert_weights

    done = convert_weights(args.src, args.dst)
    print(f"wrote {args.dst}: {done['tensors']} tensors, {done['bytes']} bytes (read with torch.load(weights_only=True))")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusion", description="Fuse model ensembles and build serving bundles.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="train the default model zoo (seeded)")
    z.add_argument("--data", default="digits", help="'digits' or a .npz/.csv file")
    z.add_argument("--label-column", default="label")
    z.add_argument("--scenario", choices=["independent", "shared_base", "swa", "snapshots"], default="independent",
                   help="swa: one SGD run averaged along its trajectory (members swa, sgd_final); snapshots: one member "
                        "per cosine-restart cycle (Huang et al. 2017); both spend --epochs, for an equal-cost comparison")
    z.add_argument("--out", default="artifacts/zoo", help="parent directory; members go to OUT/SCENARIO")
    z.add_argument("--n-mlp", type=int, default=5)
    z.add_argument("--n-cnn", type=int, default=3)
    z.add_argument("--cnn-shift-copies", type=int, default=1, metavar="N",  # = ZooConfig.cnn_shift_copies
                   help="each CNN also trains on N copies of the train split shifted by up to one pixel, drawn "
                        "from its seed (default %(default)s; 0: the plain split)")
    z.add_argument("--epochs", type=int, default=40)
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--n-cycles", type=int, default=5, help="snapshots: learning-rate cycles (members); must divide --epochs")
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser("build", help="build a verified serving bundle")
    b.add_argument("--recipe", help="TOML recipe (flags override it); examples/recipe.toml has every key, commented")
    b.add_argument("--combiner", action=_RegistryNames, names=combiner_names)
    b.add_argument("--weights", type=_member_weights, help=WEIGHTS_HELP)
    b.add_argument("--zoo", help="zoo directory (trained when empty)")
    b.add_argument("--out", help="bundle directory (default artifacts/bundle)")
    b.add_argument("--split", nargs="?", const="", metavar="DIR",
                   help="also write a front bundle whose members are remote and one bundle per member (default DIR: "
                        "[serve] split_dir, else OUT-split; the recipe's `[serve] split = true` does the same); "
                        "see deploy/overlays/split and deploy/compose-split.yaml")
    b.add_argument("--url-template",
                   help="each remote member's URL in the front bundle ({name}: the member, {host}: it as a DNS label; "
                        f"default: [serve] url_template, else {SPLIT_URL_TEMPLATE}; "
                        "FUSION_MEMBER_URL_<NAME> overrides it when serving)")
    b.set_defaults(func=cmd_build)

    sp = sub.add_parser("split", help="split a built bundle: a front with remote members + one bundle per member")
    sp.add_argument("bundle")
    sp.add_argument("--out", help="output directory (default BUNDLE-split)")
    sp.add_argument("--url-template", default=SPLIT_URL_TEMPLATE, help="as `fusion build --url-template`")
    sp.set_defaults(func=cmd_split)

    d = sub.add_parser("distill", help="distil an ensemble (a zoo's or a bundle's) into one student")
    d.add_argument("--recipe", help="TOML recipe: its [data], [zoo], [ensemble] and [distill] sections (flags override)")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--zoo", help="zoo directory whose ensemble is the teacher (default: the recipe's)")
    src.add_argument("--bundle", help="bundle directory whose variant is the teacher (run in onnxruntime)")
    d.add_argument("--teacher", default="ensemble", help="the bundle variant to distil (with --bundle)")
    d.add_argument("--out", default="artifacts/distilled", help="directory for NAME.safetensors/.json/.history.json")
    d.add_argument("--name", default="distilled")
    d.add_argument("--onnx", action="store_true", help="also export NAME.onnx through the parity gate")
    d.add_argument("--arch", help="student architecture (mlp | cnn)")
    d.add_argument("--hidden", type=_ints, help="MLP student widths, e.g. 256,256")
    d.add_argument("--epochs", type=int)
    d.add_argument("--temperature", type=float)
    d.add_argument("--alpha", type=float)
    d.add_argument("--seed", type=int)
    d.set_defaults(func=cmd_distill)

    c = sub.add_parser("compare", help="print the comparison table of a bundle's variants and members")
    c.add_argument("--bundle", required=True)
    c.add_argument("--out-dir", help="also write comparison.md, comparison.json and comparison.png here")
    c.add_argument("--data", help="the data set the bundle was built on (default: its manifest's, for digits)")
    c.add_argument("--label-column", default="label")
    c.add_argument("--split", choices=["val", "test"], default="test")
    c.add_argument("--rounds", type=int, default=300, help="interleaved latency rounds")
    c.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="render a bundle's offline comparison as one self-contained HTML file")
    r.add_argument("--bundle", default="artifacts/bundle")
    r.add_argument("--out", default="report.html")
    r.set_defaults(func=cmd_report)

    m = sub.add_parser("merge", help="merge safetensors checkpoints into one (mergekit method names)")
    m.add_argument("--config", metavar="MERGE.yml", help="a mergekit YAML config (merge_method, base_model, models, "
                   "parameters, dtype, out_dtype, ...) instead of --method/--models/--base/--weights/--param; --out is "
                   "then a Hugging Face directory")
    m.add_argument("--method", action=_RegistryNames, names=merge_method_names)  # required without --config
    m.add_argument("--models", nargs="+", metavar="CKPT",
                   help="members: .safetensors files or Hugging Face model directories (model.safetensors, or shards + "
                        "model.safetensors.index.json) with identical keys and shapes; no spec or --arch needed for weight-only methods")
    m.add_argument("--base", help="the shared base checkpoint (file or HF directory), for task-vector methods")
    m.add_argument("--weights", type=_floats, help="one weight per model, e.g. 1,1,2")
    m.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter, repeatable (e.g. density=0.2, scope=global)")
    m.add_argument("--arch", help="zoo architecture when no <name>.json spec sits next to the checkpoints: enables metrics, "
                   "BatchNorm recomputation and data-aware methods (weight-only merges need none)")
    m.add_argument("--data", default="digits", help="data for metrics, BN statistics and data-aware methods ('none' to skip); "
                   "used only when the architecture is known (a spec or --arch)")
    m.add_argument("--out", required=True, help="OUT.safetensors (one file; a zoo member's spec goes to OUT.json), or a new "
                   "directory: shards + index + the base's (else the first model's) config and tokenizer files")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged float tensors (default: the inputs'; bf16/fp16 are merged in float32 either way)")
    m.add_argument("--max-shard-size", metavar="SIZE", help="largest shard of a directory output, e.g. 500MB, 2GB, 1GiB (default 5GB, as transformers)")
    m.set_defaults(func=cmd_merge)

    a = sub.add_parser("align", help="permute checkpoints into a reference's basis (Git Re-Basin)")
    a.add_argument("--method", choices=["weight_matching", "activation_matching"], default="weight_matching")
    a.add_argument("--arch", help="architecture when no <name>.json spec sits next to the checkpoints")
    a.add_argument("--reference", required=True, metavar="A.safetensors")
    a.add_argument("--models", nargs="+", required=True, metavar="B.safetensors")
    a.add_argument("--data", default="digits", help="data for activation matching and metrics")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out-dir", required=True)
    a.add_argument("--source", help="member source of any other architecture (timm:NAME, torchvision:NAME, python:pkg.mod:factory): "
                                    "its permutation spec is derived from a torch.fx trace; transformers are refused")
    a.add_argument("--args", type=_json_object, default={}, metavar="JSON", help="the source's constructor arguments, e.g. '{\"num_classes\": 5}'")
    a.add_argument("--input-shape", type=_ints, metavar="C,H,W", help="one input's shape (no batch) to trace the source's model "
                                                                     "(default: timm's pretrained_cfg input_size)")
    a.set_defaults(func=cmd_align)

    r = sub.add_parser("barrier", help="loss barrier on the straight path between two checkpoints")
    r.add_argument("a", metavar="A.safetensors")
    r.add_argument("b", metavar="B.safetensors")
    r.add_argument("--arch", help="architecture when no <name>.json spec sits next to the checkpoints")
    r.add_argument("--align", action="store_true", help="also measure after weight matching B to A")
    r.add_argument("--points", type=int, default=11)
    r.add_argument("--data", default="digits")
    r.add_argument("--json", help="write the paths and barriers as JSON here")
    r.add_argument("--plot", help="write a PNG of loss and accuracy along the paths here")
    r.set_defaults(func=cmd_barrier)

    rs = sub.add_parser("recipe-schema", help="print the JSON Schema of a build recipe (for editors: TOML as JSON)")
    rs.set_defaults(func=cmd_recipe_schema)

    cw = sub.add_parser("convert-weights", help="a torch checkpoint (.pt/.bin) as safetensors, read with "
                                                "torch.load(weights_only=True): no arbitrary unpickling")
    cw.add_argument("src", metavar="IN.pt", help="a state dict, or a dict holding one under 'state_dict' or 'model'")
    cw.add_argument("dst", metavar="OUT.safetensors")
    cw.set_defaults(func=cmd_convert_weights)

    v = sub.add_parser("verify", help="verify a bundle's digests")
    v.add_argument("bundle")
    v.set_defaults(func=cmd_verify)
    return p


# the offline stack (pyproject's [build] extra): the base install serves bundles and has none of it
BUILD_MODULES = frozenset({"torch", "onnx", "onnxscript", "scipy", "sklearn", "safetensors", "tqdm", "matplotlib"})  # not yaml: bentoml itself imports it
BUILD_HINT = "install fusion-serve[build] (pip install 'fusion-serve[build]'; in a checkout: make install-build)"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)  # --help imports the registries, hence torch: inside the try
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
        return args.func(args)
    except FusionError as exc:
        print(f"fusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a base (serving-only) install: say what to install, not a traceback
        if (exc.name or "").partition(".")[0] not in BUILD_MODULES:
            raise
        print(f"fusion: error: this command needs the offline build stack, and {exc.name} is not installed: "
              f"{BUILD_HINT}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
