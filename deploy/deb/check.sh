#!/usr/bin/env bash
# CI check of the Debian package (run by .ci/run):
#   - installs cargo-deb from crates.io, pinned (skipped when that version is
#     already installed, so a warm machine pays nothing);
#   - builds the .deb (deploy/deb/build.sh: a release build, then cargo deb);
#   - installs it into a scratch root, container-less: `dpkg --root` with its
#     own empty package database records the files and the conffiles exactly as
#     on a real system (no maintainer script runs there: there is none before
#     unpack, and configure would need a whole system in the root);
#   - checks every file and mode, the conffiles, that the maintainer scripts
#     parse, runs the postinst (deploy/deb/check-postinst.sh: in a private
#     mount namespace over a copy of /etc, the users, groups and 0700
#     directories it makes, an admin's narrower config mode kept across a
#     reconfigure, the daemon's user kept out of the signer's config and key
#     but able to reach its socket), that the packaged binary runs and its man
#     pages and completions are its own;
#   - `systemd-analyze verify` on the installed units and
#     `systemd-analyze security --offline=true` on each: prints the exposure
#     score, and fails if a packaged unit scores worse than its source in
#     deploy/ (deploy/check.sh holds the sources to their recorded figures).
set -euo pipefail
cd "$(dirname "$0")/../.."

CARGO_DEB_VERSION=3.8.0

start=$SECONDS
if [[ "$(cargo deb --version 2>/dev/null)" != *"$CARGO_DEB_VERSION"* ]]; then
  echo "== installing cargo-deb $CARGO_DEB_VERSION (crates.io)"
  cargo install --locked --quiet cargo-deb --version "$CARGO_DEB_VERSION"
fi
echo "cargo-deb: $(cargo deb --version)"

deb=$(deploy/deb/build.sh)
echo "built $deb in $((SECONDS - start)) s"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/var/lib/dpkg/triggers"
: >"$root/var/lib/dpkg/status"
dpkg --root="$root" --log=/dev/null --force-not-root --unpack "$deb" >/dev/null

failed=0
fail() { echo "FAIL: $*" >&2; failed=1; }

# path mode [owner]: every file the package must install, with its mode.
expect() {
  local path=$1 mode=$2 got
  if [[ ! -e "$root$path" ]]; then fail "$path is missing"; return; fi
  got=$(stat -c %a "$root$path")
  [[ "$got" == "$mode" ]] || fail "$path has mode $got, expected $mode"
}
expect /usr/bin/rotator 755
# Conffiles wait as NAME.dpkg-new until configure moves them into place.
expect /etc/rotator/rotator.toml.dpkg-new 640
expect /etc/rotator-signer/rotator.toml.dpkg-new 640
expect /usr/lib/systemd/system/rotator.service 644
expect /usr/lib/systemd/system/rotator-signer.service 644
expect /usr/share/bash-completion/completions/rotator 644
expect /usr/share/zsh/vendor-completions/_rotator 644
expect /usr/share/fish/vendor_completions.d/rotator.fish 644
expect /usr/share/man/man1/rotator.1.gz 644
expect /usr/share/man/man1/rotator-add-user.1.gz 644
expect /usr/share/doc/rotator/README.md 644

# Conffiles: what dpkg recorded, so an upgrade never overwrites an edited config.
conffiles=$(dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Conffiles}\n' rotator)
for c in /etc/rotator/rotator.toml /etc/rotator-signer/rotator.toml; do
  grep -q "^ $c " <<<"$conffiles" || fail "$c is not a conffile (dpkg recorded: $conffiles)"
done
echo "conffiles:$(awk '{printf " %s", $1}' <<<"$conffiles")"

# Maintainer scripts: present, executable, valid sh, and the postinst makes the
# users and the 0700 data directories.
ctrl="$root/ctrl"
dpkg-deb --control "$deb" "$ctrl"
for s in postinst prerm postrm; do
  [[ -x "$ctrl/$s" ]] || { fail "maintainer script $s is missing"; continue; }
  sh -n "$ctrl/$s" || fail "maintainer script $s does not parse"
done
grep -q 'deb-systemd-helper update-state rotator.service' "$ctrl/postinst" ||
  fail "postinst lacks cargo-deb's systemd unit handling"

# The postinst, run for real (install, then an upgrade over an admin's
# narrower config modes) in a private mount namespace, and the two users kept
# apart around the signer's socket: deploy/deb/check-postinst.sh.
deploy/deb/check-postinst.sh "$root" "$ctrl" || fail "postinst: see above"

# The packaged binary runs, and its man page and completions are its own.
version=$("$root/usr/bin/rotator" --version)
echo "packaged binary: $version"
zcat "$root/usr/share/man/man1/rotator.1.gz" | grep -q '^\.TH rotator 1' || fail "rotator.1.gz is not rotator's man page"
grep -q 'complete -F _rotator' "$root/usr/share/bash-completion/completions/rotator" ||
  fail "the bash completion does not complete rotator"
grep -q '^#compdef rotator' "$root/usr/share/zsh/vendor-completions/_rotator" ||
  fail "the zsh completion does not complete rotator"
grep -q 'complete -c rotator' "$root/usr/share/fish/vendor_completions.d/rotator.fish" ||
  fail "the fish completion does not complete rotator"
echo "man pages: $(ls "$root/usr/share/man/man1" | wc -l)"

# The installed units: they verify and score as well as their sources. verify
# insists that ExecStart's binary exists (and --root would hide the system's
# own units), so it checks a copy whose /usr/bin/rotator is the scratch root's.
if command -v systemd-analyze >/dev/null 2>&1; then
  mkdir -p "$root/verify"
  for unit in rotator.service rotator-signer.service; do
    installed="$root/usr/lib/systemd/system/$unit"
    grep -q '^ExecStart=/usr/bin/rotator ' "$installed" || fail "$unit: ExecStart is not the packaged /usr/bin/rotator"
    sed "s#/usr/bin/rotator#$root/usr/bin/rotator#g" "$installed" >"$root/verify/$unit"
    if out=$(systemd-analyze verify --man=no "$root/verify/$unit" 2>&1) && [[ -z "$out" ]]; then
      echo "$unit: systemd-analyze verify clean"
    else
      fail "$unit: systemd-analyze verify: $out"
    fi
    score() {
      systemd-analyze security --offline=true --no-pager "$1" 2>/dev/null |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p'
    }
    got=$(score "$installed")
    source_score=$(score "deploy/$unit")
    echo "$unit: exposure $got (systemd-analyze security --offline=true; deploy/$unit: $source_score)"
    [[ -n "$got" ]] || fail "$unit: no exposure score"
    [[ "$got" == "$source_score" ]] || fail "$unit: the packaged unit scores $got, its source $source_score"
  done
else
  echo "systemd units: NOT checked (no systemd-analyze on this machine)" >&2
fi

if ((failed)); then
  echo "deploy/deb/check.sh: FAILED (see above)" >&2
  exit 1
fi
echo "deploy/deb/check.sh: $deb installs, every file, mode and conffile in place ($((SECONDS - start)) s)"
