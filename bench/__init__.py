


def missing_bundle(bundle) -> bool:
    """True (having said what to do on stderr) when `bundle` is no bundle directory."""
    import sys
    from pathlib import Path

    if (Path(bundle) / "manifest.json").is_file():
        return False
    print(f"no bundle at {bundle}: run `make bundle` (or `fusion build --out {bundle}`) first", file=sys.stderr)
    return True
