"""Print docs/RELIABILITY.md's table of measured figures from test-artifacts/reliability/*.json.

    .venv/bin/python -m pytest tests/reliability -q      # writes the JSON figures
    .venv/bin/python -m tests.reliability.report         # prints the markdown table
"""

from __future__ import annotations

import json

from tests.reliability.harness import ARTIFACTS


def _load() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(ARTIFACTS.glob("*.json"))}


def _fmt(v) -> str:
    return "–" if v is None else str(v)


def summarize(case: str, f: dict) -> str:
    """One line of figures per case: requests sent, failed, p99, memory, and what else the case measures."""
    g = f.get
    if case == "01_steady_load":
        return (f"{g('requests_sent')} sent in {g('seconds')} s at concurrency {g('concurrency')} ({g('rps')} req/s), "
                f"{g('failed')} failed; p50 {g('p50_ms')} ms, p99 {g('p99_ms')} ms; worker RSS {g('rss_start_mb')} → "
                f"{g('rss_end_mb')} MB ({g('rss_growth_pct')} %) after {g('warmup_requests')} warm-up requests")
    if case == "02_overload":
        a = g("after_recovery") or {}
        return (f"limit {g('limit')}, all slots held, burst of {g('burst')}: {g('burst_statuses')}, refusal p99 "
                f"{g('refusal_p99_ms')} ms (max {g('refusal_max_ms')} ms); health {sorted(set((g('health') or {}).values()))}; "
                f"recovered in {g('recovered_within_s')} s, then {a.get('requests_sent')} sent / {a.get('failed')} failed; "
                f"natural bursts ({g('natural_burst_requests')} large requests): {g('natural_burst_statuses')}")
    if case == "02b_timeout":
        return f"no response in {g('timeout_s')} s: {g('status')} {json.dumps(g('body'))}; next request {g('next_request')}"
    if case == "03_member_hangs":
        return (f"deadline {g('deadline_ms')} ms, hang {g('hang_s')} s: {g('requests_sent')} sent, statuses {g('statuses')}, "
                f"p50 {g('p50_ms')} ms, max {g('max_ms')} ms; threads {g('threads_baseline')} → max {g('threads_max')} "
                f"(bound {g('thread_bound')}); after the hang: {g('after_hang_status')}")
    if case == "04a_member_raises_strict":
        return f"{g('status')} `{g('error')}`; fused ensemble still {g('fused_ensemble_status')}"
    if case == "04b_member_raises_quorum":
        return (f"{g('requests')} × 200 degraded, max |Δ| vs healthy-subset oracle {g('max_abs_diff_vs_healthy_oracle'):.1e}, "
                f"max {g('max_ms')} ms")
    if case == "05_bad_bundle_at_start":
        s = g("servers") or {}
        return "; ".join(f"{k}: readyz {v['readyz']}, v2 ready {v['v2_ready']}, /predict {v['predict']}" for k, v in s.items())
    if case == "06_hostile_model_files":
        return f"{len(g('refused') or {})} hostile bundles refused by runtime.load; canary created: {g('canary_created')}"
    if case == "06_pickle_as_safetensors":
        return f"{', '.join(f'{k}: {v}' for k, v in (g('refused') or {}).items())}; canary created: {g('canary_created')}"
    if case == "07_sigterm_under_load":
        return (f"{g('held_in_flight')} slow requests in flight + stream ({g('stream_before_signal')} before the signal, "
                f"{g('stream_before_failed')} failed): held {g('held_ok')}/{g('held_in_flight')} → 200; readiness while draining "
                f"{g('readiness_while_draining')}; exit {g('exit_code')} after {g('exited_after_s')} s (grace {g('grace_s')} s); "
                f"after the signal: {g('stream_after_signal')}")
    if case == "08_worker_killed":
        d, a = g("during_recovery") or {}, g("after_recovery") or {}
        return (f"2 workers; killed worker held {g('held_on_victim')} → {g('victim_held_failed')} failed; survivor held "
                f"{g('held_on_survivor')} → {g('survivor_held_ok')} × 200; during recovery {d.get('requests_sent')} sent / "
                f"{d.get('failed')} failed; respawned {g('respawned')}, new worker answered {g('new_worker_answered')}; "
                f"after: {a.get('requests_sent')} sent / {a.get('failed')} failed, p99 {a.get('p99_ms')} ms")
    if case == "09_hot_swap":
        return (f"{g('swaps')} swaps (max {g('swap_s_max')} s each) under load: {g('requests_sent')} sent, {g('failed')} failed, "
                f"by version {g('responses_by_version')}; p99 {g('p99_ms')} ms; RSS {g('rss_baseline_mb')} → {g('rss_after_mb')} MB")
    if case == "10_failed_swap":
        return (f"{g('attempts')} refused swaps {sorted(set((g('refused') or {}).values()))} under load: {g('requests_sent')} sent, "
                f"{g('failed')} failed; canary created: {g('canary_created')}")
    if case == "11_schema_fuzz":
        return (f"{g('operations')} operations, {g('requests_sent')} requests in {g('seconds')} s: {g('statuses')}; "
                f"{g('failures')} check failures")
    if case == "12_input_fuzz":
        return f"{g('requests_sent')} requests, {g('server_errors')} 5xx; by kind: " + ", ".join(
            f"{k} {v}" for k, v in (g("examples_by_kind") or {}).items())
    if case == "13_hostile_http":
        c = g("cases") or {}
        lim = c.get("over_limit_chunked", {})
        return (f"{g('requests_sent')} hostile requests, all 4xx: " + ", ".join(
            f"{k} {dict((s, n) for s, n in v.items() if isinstance(s, str) and s.isdigit())}" for k, v in c.items()
            if k not in ("slow_chunked_body", "over_limit_chunked", "over_limit_declared"))
            + f"; 64 MiB chunked body: 413 after {lim.get('body_bytes_sent_before_answer')} bytes, worker RSS "
              f"{lim.get('worker_rss_mb_before')} → {lim.get('worker_rss_mb_after')} MB; declared 64 MiB: 413 in "
              f"{c.get('over_limit_declared', {}).get('answered_s')} s with 0 body bytes; slow body 200 while "
              f"{c.get('slow_chunked_body', {}).get('others_answered_meanwhile')} others were answered")
    if case == "14_auth":
        return f"{json.dumps(g('statuses'))}; tokens in the log: {g('tokens_in_log') or 'none'} ({g('log_bytes')} bytes checked)"
    if case == "15_error_contract":
        return f"{g('requests_sent')} error responses {g('statuses')}, {g('violations')} violations"
    if case == "16_dependency_floor":
        return f"installed {g('installed')}; floors {g('floors')}"
    return json.dumps({k: v for k, v in f.items() if k not in ("case", "recorded")})


def main() -> None:
    figures = _load()
    print("| Case | Measured (last run) | Recorded |")
    print("|---|---|---|")
    for case, f in figures.items():
        print(f"| {case} | {summarize(case, f)} | {f.get('recorded', '')} |")


if __name__ == "__main__":
    main()
