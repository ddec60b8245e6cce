


def missing_bundle(bundle) -> bool:
    """True (having said what to do on stderr) when `bundle` is no bundle directory."""
    import sys
    from pathlib import Path

    if (Path(bundle) / "manifest.json").is_file():
        return False
    print(f"no bundle at {bundle}: run `make bundle` (or `fusion build --out {bundle}`) first", file=sys.stderr)
    return True


def metric_sums(text: str, names: tuple[str, ...], **labels: str) -> dict[str, float]:
    """Sums of the Prometheus samples named `names` whose labels include `labels`, from /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in out and all(sample.labels.get(k) == v for k, v in labels.items()):
                out[sample.name] += sample.value
    return out
