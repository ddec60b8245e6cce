#!/usr/bin/env bash
# Smoke test of a running fusion-serve: readiness, a prediction, the A/B report, the metrics, and
# that admin refuses a caller without the admin token.
#
#   deploy/smoke.sh URL            e.g. http://127.0.0.1:3000, or a Kubernetes Service via port-forward
#
# Environment: FUSION_INFERENCE_TOKEN (sent as a bearer token when set), FUSION_ADMIN_TOKEN (when
# set, GET /admin/routing must answer 200 with it), SMOKE_READY_TIMEOUT
# (seconds to wait for /readyz, default 120), SMOKE_EXPECT_DEVICE (e.g. `cuda`: every model in
# GET /info must run on that device), PYTHON (default python3). Needs curl and python3.
# Exit status 0 when every check passed, 1 on the first failure.
set -euo pipefail

URL="${1:?usage: deploy/smoke.sh URL (e.g. http://127.0.0.1:3000)}"
URL="${URL%/}"
PY="${PYTHON:-python3}"
READY_TIMEOUT="${SMOKE_READY_TIMEOUT:-120}"
AUTH=()
if [ -n "${FUSION_INFERENCE_TOKEN:-}" ]; then AUTH=(-H "Authorization: Bearer ${FUSION_INFERENCE_TOKEN}"); fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "ok:   $*"; }

# request METHOD PATH [BODY] -> the status code; the body is left in $TMP/body
request() {
  local method="$1" path="$2" data="${3:-}"
  local args=(-sS -o "$TMP/body" -w '%{http_code}' --max-time 10 -X "$method" ${AUTH[@]+"${AUTH[@]}"})
  if [ -n "$data" ]; then args+=(-H 'Content-Type: application/json' --data "$data"); fi
  : >"$TMP/body"
  curl "${args[@]}" "$URL$path" 2>"$TMP/curl.err" || true  # -w prints 000 when nothing answered
}

# check_json PYTHON-EXPRESSIONS: runs them with `d` = the JSON body; prints what they print
check_json() {
  "$PY" -c "
import json, sys
d = json.load(open(sys.argv[1]))
$1
" "$TMP/body"
}

# 1. readiness: /readyz answers 200 once the bundle is verified, loaded and warmed up
deadline=$((SECONDS + READY_TIMEOUT))
while :; do
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/readyz" || true)"
  [ "$code" = 200 ] && break
  [ "$SECONDS" -ge "$deadline" ] && fail "GET /readyz answered ${code:-nothing} for ${READY_TIMEOUT}s"
  sleep 1
done
ok "GET /readyz 200"
code="$(request GET /livez)"
[ "$code" = 200 ] || fail "GET /livez answered $code"
ok "GET /livez 200"

# 2. the served bundle
code="$(request GET /info)"
[ "$code" = 200 ] || fail "GET /info answered $code: $(head -c 300 "$TMP/body")"
VERSION="$(check_json 'print(d["bundle_version"])')" || fail "GET /info: no bundle_version: $(head -c 300 "$TMP/body")"
check_json 'assert d["input"]["shape"][1] == 64, d["input"]' >/dev/null \
  || fail "GET /info: expected 64 input features (8x8 digits); got $(check_json 'print(d["input"])' 2>/dev/null)"
check_json 'print(json.dumps(d["classes"]))' >"$TMP/classes" || fail "GET /info: no classes"
ok "GET /info: bundle $VERSION"
if [ -n "${SMOKE_EXPECT_DEVICE:-}" ]; then
  devices="$(check_json "
models = {**d.get('variants', {}), **d.get('members', {})}
wrong = {k: m.get('device') for k, m in models.items() if not str(m.get('device')).startswith('$SMOKE_EXPECT_DEVICE')}
assert models and not wrong, f'expected every model on $SMOKE_EXPECT_DEVICE; got {wrong or models}'
print(sorted({m['device'] for m in models.values()}))
")" || fail "GET /info: $(check_json "print({k: m.get('device') for k, m in {**d.get('variants', {}), **d.get('members', {})}.items()})" 2>&1)"
  ok "GET /info: every model on $devices"
fi

# 3. a prediction: the first image of the scikit-learn digits set (a 0), 64 raw pixel values 0..16
ROW='[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]'
code="$(request POST /predict "{\"inputs\": [$ROW, $ROW]}")"
[ "$code" = 200 ] || fail "POST /predict answered $code: $(head -c 300 "$TMP/body")"
got="$(check_json "
classes = json.load(open('$TMP/classes'))
p, pr = d['predictions'], d['probabilities']
assert len(p) == 2 and len(pr) == 2, f'expected 2 predictions for 2 rows; got {len(p)}'
assert all(x in classes for x in p), f'predictions {p} are not among the classes {classes}'
assert all(len(r) == len(classes) and abs(sum(r) - 1) < 1e-3 for r in pr), f'probabilities {pr} do not sum to 1'
assert d['bundle_version'] == '$VERSION', d['bundle_version']
print(f\"{p[0]} (variant {d.get('variant')}, p={max(pr[0]):.3f})\")
")" || fail "POST /predict: unexpected answer: $(head -c 300 "$TMP/body")"
ok "POST /predict: $got"

# 4. the A/B report (per-variant statistics of this replica)
code="$(request GET /ab/report)"
if [ "$code" = 404 ]; then
  echo "skip: GET /ab/report answered 404 (this build has no A/B report)"
else
  [ "$code" = 200 ] || fail "GET /ab/report answered $code: $(head -c 300 "$TMP/body")"
  check_json 'assert isinstance(d, dict) and d, d' >/dev/null || fail "GET /ab/report: not a JSON object"
  ok "GET /ab/report 200"
fi

# 5. Prometheus metrics
code="$(request GET /metrics)"
[ "$code" = 200 ] || fail "GET /metrics answered $code"
grep -q '^# TYPE ' "$TMP/body" || fail "GET /metrics: not Prometheus text format"
grep -q '^fusion_' "$TMP/body" || fail "GET /metrics: no fusion_* metric"
if grep -q '^fusion_requests_total{' "$TMP/body"; then
  ok "GET /metrics: fusion_requests_total present"
else
  # behind a load balancer this replica may not be the one that answered the prediction
  echo "note: GET /metrics: no fusion_requests_total sample on the replica that answered"
  ok "GET /metrics: fusion_* metrics present"
fi
# 6. admin is token-only: a caller without the admin token is refused, even from this machine
# (a port-forward or a proxy connects from loopback; deploy/ sets FUSION_ADMIN_LOOPBACK=0)
: >"$TMP/body"
code="$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 10 "$URL/admin/routing" 2>"$TMP/curl.err" || true)"
case "$code" in
  401 | 403) ok "GET /admin/routing without the admin token: $code" ;;
  200) fail "GET /admin/routing answered 200 without the admin token: anyone who reaches $URL can reroute or swap (set FUSION_ADMIN_TOKEN and FUSION_ADMIN_LOOPBACK=0, deploy/README.md)" ;;
  *) fail "GET /admin/routing without the admin token: expected 401 or 403; got $code: $(head -c 300 "$TMP/body")" ;;
esac
if [ -n "${FUSION_ADMIN_TOKEN:-}" ]; then
  code="$(curl -sS -o "$TMP/body" -w '%{http_code}' --max-time 10 -H "Authorization: Bearer ${FUSION_ADMIN_TOKEN}" \
    "$URL/admin/routing" 2>"$TMP/curl.err" || true)"
  [ "$code" = 200 ] || fail "GET /admin/routing with FUSION_ADMIN_TOKEN answered $code: $(head -c 300 "$TMP/body")"
  ok "GET /admin/routing with the admin token 200"
fi
echo "smoke test passed: $URL (bundle $VERSION)"
