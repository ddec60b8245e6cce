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


def cmd_zoo(args) -> int:
    from fusion.data import load
    from fusion.zoo import TrainConfig, ZooConfig, train_zoo

    data = load(args.data) if args.data == "digits" else load(args.data, label_column=args.label_column)
    cfg = ZooConfig(n_mlp=args.n_mlp, n_cnn=args.n_cnn, seed=args.seed, train=TrainConfig(epochs=args.epochs))
    out = Path(args.out) / args.scenario
    if args.scenario == "independent":
        specs = train_zoo(data, out, cfg)
    else:
        from fusion.zoo import train_shared_base_zoo

        specs = train_shared_base_zoo(data, out, cfg)
    for s in specs:
        print(f"{s.name:12s} {s.arch:4s} seed={s.seed:<5d} val={s.metrics['val_accuracy']:.4f} test={s.metrics['test_accuracy']:.4f}")
    print(f"wrote {len(specs)} members to {out}")
    return 0


def cmd_build(args) -> int:
    from fusion.build import build_bundle
    from fusion.recipe import load_recipe, override

    recipe = load_recipe(args.recipe)
    recipe = override(recipe, "ensemble", combiner=args.combiner, weights=tuple(args.weights) if args.weights else None)
    recipe = override(recipe, "zoo", dir=args.zoo)
    recipe = override(recipe, "build", out=args.out)
    manifest = build_bundle(recipe)
    print(f"bundle {manifest.bundle_version} written to {recipe.build.out}")
    for name, v in manifest.entries().items():
        print(f"  {name:12s} {v.kind:9s} test accuracy {v.metrics.get('test_accuracy', float('nan')):.4f}  {v.file}")
    return 0


def cmd_verify(args) -> int:
    from fusion.bundle import read_bundle

    b = read_bundle(args.bundle)
    print(json.dumps({"bundle_version": b.manifest.bundle_version, "files_verified": len(b.manifest.entries())}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusion", description="Fuse model ensembles and build serving bundles.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zoo", help="train the default model zoo (seeded)")
    z.add_argument("--data", default="digits", help="'digits' or a .npz/.csv file")
    z.add_argument("--label-column", default="label")
    z.add_argument("--scenario", choices=["independent", "shared_base"], default="independent")
    z.add_argument("--out", default="artifacts/zoo", help="parent directory; members go to OUT/SCENARIO")
    z.add_argument("--n-mlp", type=int, default=5)
    z.add_argument("--n-cnn", type=int, default=3)
    z.add_argument("--epochs", type=int, default=40)
    z.add_argument("--seed", type=int, default=0)
    z.set_defaults(func=cmd_zoo)

    b = sub.add_parser("build", help="build a verified serving bundle")
    b.add_argument("--recipe", help="TOML recipe (flags override it)")
    b.add_argument("--combiner", help="hard_vote | soft_vote | logit_mean | geometric_mean | stacking | mean | weighted_mean | median")
    b.add_argument("--weights", type=_floats, help="member weights, e.g. 1,1,2,1,1")
    b.add_argument("--zoo", help="zoo directory (trained when empty)")
    b.add_argument("--out", help="bundle directory (default artifacts/bundle)")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("verify", help="verify a bundle's digests")
    v.add_argument("bundle")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except FusionError as exc:
        print(f"fusion {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
