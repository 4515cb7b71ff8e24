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
#     parse, runs the postinst (in a private mount namespace over a copy of
#     /etc: the users, groups and 0700 directories it makes, without touching
#     this machine), that the packaged binary runs and its man pages and
#     completions are its own;
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

# The postinst, run for real (twice: install, then an upgrade) in a private
# mount namespace over a copy of /etc and an empty /var/lib, so the users and
# directories it makes are checked without touching this machine.
if command -v unshare >/dev/null 2>&1 && unshare --mount --propagation private true 2>/dev/null; then
  sandbox="$root/sandbox"
  mkdir -p "$sandbox"
  cp -a /etc "$sandbox/etc"
  # DPKG_MAINTSCRIPT_*: cargo-deb's deb-systemd-helper snippets run as under dpkg.
  if out=$(unshare --mount --propagation private env ROOT="$root" SANDBOX="$sandbox" CTRL="$ctrl" \
    DPKG_MAINTSCRIPT_PACKAGE=rotator DPKG_MAINTSCRIPT_NAME=postinst sh -euc '
    mount --bind "$SANDBOX/etc" /etc
    mount -t tmpfs tmpfs /var/lib
    mount -t tmpfs tmpfs /usr/lib/systemd/system
    cp "$ROOT"/usr/lib/systemd/system/*.service /usr/lib/systemd/system/
    mkdir -p /etc/rotator /etc/rotator-signer
    cp "$ROOT/etc/rotator/rotator.toml.dpkg-new" /etc/rotator/rotator.toml
    cp "$ROOT/etc/rotator-signer/rotator.toml.dpkg-new" /etc/rotator-signer/rotator.toml
    sh "$CTRL/postinst" configure
    sh "$CTRL/postinst" configure 0.1.0-1
    getent passwd rotator | cut -d: -f1,3,7
    id -nG rotator
    stat -c "%n %a %U:%G" /var/lib/rotator /var/lib/rotator-signer /etc/rotator/rotator.toml /etc/rotator-signer/rotator.toml
    for u in rotator rotator-signer; do
      if [ -e /etc/systemd/system/multi-user.target.wants/$u.service ]; then echo "$u.service enabled"; fi
    done
  ' 2>&1); then
    echo "postinst (run twice in a private mount namespace):"
    sed 's/^/  /' <<<"$out"
    uid=$(grep '^rotator:' <<<"$out" | cut -d: -f2)
    [[ -n "$uid" && "$uid" -lt 1000 ]] || fail "postinst: rotator is not a system user ($out)"
    grep -q '^rotator:.*:/usr/sbin/nologin$' <<<"$out" || fail "postinst: rotator can log in"
    grep -Eq '^rotator( [^ :/]+)* rotator-signer( |$)' <<<"$out" ||
      fail "postinst: rotator is not in the group rotator-signer"
    grep -q '^/var/lib/rotator 700 rotator:rotator$' <<<"$out" || fail "postinst: /var/lib/rotator is not 0700 rotator:rotator"
    grep -q '^/var/lib/rotator-signer 700 rotator-signer:rotator-signer$' <<<"$out" ||
      fail "postinst: /var/lib/rotator-signer is not 0700 rotator-signer:rotator-signer"
    grep -q '^/etc/rotator/rotator.toml 640 root:rotator$' <<<"$out" || fail "postinst: rotator.toml is not 0640 root:rotator"
    grep -q 'service enabled$' <<<"$out" && fail "postinst enabled a unit (they must wait for the config)"
    grep -q 'deb-systemd-helper' <<<"$out" && fail "postinst: the systemd snippets complained"
  else
    fail "postinst failed: $out"
  fi
else
  echo "postinst: NOT run (no unshare with mount namespaces here); only parsed" >&2
fi

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
