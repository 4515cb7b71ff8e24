#!/usr/bin/env bash
# The package's postinst and its users, run for real without touching this
# machine: in a private mount namespace over a copy of /etc and empty /var/lib,
# /run and unit directories. Called by deploy/deb/check.sh with the scratch
# root the .deb was unpacked into and its control directory:
#   deploy/deb/check-postinst.sh ROOT CTRL
# (also runnable on a root made by hand: ROOT/usr/bin/rotator,
# ROOT/usr/lib/systemd/system/*.service, ROOT/etc/*/rotator.toml.dpkg-new).
# Checks:
#   - the users, the groups and the 0700 state directories; no unit enabled;
#   - the configs' modes: 0640 with the service's group at the first configure,
#     and a stricter mode (and owner) an admin set kept by the next one;
#   - the two users apart: the daemon's user is not in the signer's group
#     (also when an earlier package put it there), cannot read the signer's
#     config or CA key, and reaches the socket of the packaged `rotator signer`
#     started with the user, groups and runtime directory its unit gives it;
#     a user outside the socket's group cannot.
# Needs root, unshare with mount namespaces, setpriv, openssl and curl.
set -euo pipefail
root=$1 ctrl=$2

for tool in unshare setpriv openssl curl; do
  command -v "$tool" >/dev/null || { echo "postinst: NOT run (no $tool here)" >&2; exit 0; }
done
if ! unshare --mount --propagation private true 2>/dev/null; then
  echo "postinst: NOT run (no unshare with mount namespaces here); only parsed" >&2
  exit 0
fi

sandbox=$(mktemp -d)
trap 'rm -rf "$sandbox"' EXIT
cp -a /etc "$sandbox/etc"

failed=0
fail() { echo "FAIL: postinst: $*" >&2; failed=1; }

# DPKG_MAINTSCRIPT_*: cargo-deb's deb-systemd-helper snippets run as under dpkg.
# /run is a fresh tmpfs too: no systemd is seen running, so the snippets call
# no systemctl of this machine.
if ! out=$(unshare --mount --propagation private env ROOT="$root" SANDBOX="$sandbox" CTRL="$ctrl" \
  DPKG_MAINTSCRIPT_PACKAGE=rotator DPKG_MAINTSCRIPT_NAME=postinst bash -euo pipefail -c '
  mount --bind "$SANDBOX/etc" /etc
  mount -t tmpfs tmpfs /var/lib
  mount -t tmpfs tmpfs /run
  mount -t tmpfs tmpfs /usr/lib/systemd/system
  cp "$ROOT"/usr/lib/systemd/system/*.service /usr/lib/systemd/system/
  mkdir -p /etc/rotator /etc/rotator-signer
  # As dpkg leaves a new conffile: the package'"'"'s owner and mode.
  install -m 0640 -o root -g root "$ROOT/etc/rotator/rotator.toml.dpkg-new" /etc/rotator/rotator.toml
  install -m 0640 -o root -g root "$ROOT/etc/rotator-signer/rotator.toml.dpkg-new" /etc/rotator-signer/rotator.toml
  sh "$CTRL/postinst" configure
  stat -c "first %n %a %U:%G" /etc/rotator/rotator.toml /etc/rotator-signer/rotator.toml

  # The admin narrows both configs; an earlier package had made the daemon a
  # member of the signer'"'"'s group. Then an upgrade configures again.
  chown rotator /etc/rotator/rotator.toml
  chmod 0600 /etc/rotator/rotator.toml
  chmod 0600 /etc/rotator-signer/rotator.toml
  chown rotator-signer /etc/rotator-signer/rotator.toml
  adduser --quiet rotator rotator-signer >/dev/null
  sh "$CTRL/postinst" configure 0.1.0-1
  stat -c "again %n %a %U:%G" /etc/rotator/rotator.toml /etc/rotator-signer/rotator.toml
  getent passwd rotator | cut -d: -f1,3,7
  echo "groups of rotator: $(id -nG rotator)"
  echo "members of rotator-signer: $(getent group rotator-signer | cut -d: -f4)"
  echo "members of rotator-socket: $(getent group rotator-socket | cut -d: -f4)"
  stat -c "%n %a %U:%G" /var/lib/rotator /var/lib/rotator-signer
  for u in rotator rotator-signer; do
    if [ -e /etc/systemd/system/multi-user.target.wants/$u.service ]; then echo "$u.service enabled"; fi
  done

  # The signer set up as docs/deploy-host.md says, started as its unit starts it.
  cd /etc/rotator-signer
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=check CA" -keyout ca.key -out ca.crt 2>/dev/null
  chown rotator-signer: ca.key && chmod 600 ca.key && chmod 644 ca.crt
  sed -i "s/^# allowed_uids = .*/allowed_uids = [$(id -u rotator)]/" rotator.toml
  unit=/usr/lib/systemd/system/rotator-signer.service
  key() { sed -n "s/^$1=//p" "$unit" | tail -n 1; }
  user=$(key User) group=$(key Group) supp=$(key SupplementaryGroups | tr " " ,)
  install -d -m "$(key RuntimeDirectoryMode)" -o "$user" -g "$group" "/run/$(key RuntimeDirectory)"
  install -d -m "$(key StateDirectoryMode)" -o "$user" -g "$group" "/var/lib/$(key StateDirectory)"
  config=$(key Environment | sed -n "s/^ROTATOR_CONFIG=//p")
  args=$(key ExecStart | sed "s#^/usr/bin/rotator ##")
  # The scratch root is 0700 (mktemp): the binary, where the signer'"'"'s user may run it.
  install -D -m 0755 "$ROOT/usr/bin/rotator" /run/pkg/rotator
  # shellcheck disable=SC2086
  (umask 077; exec setpriv --reuid="$user" --regid="$group" --groups="${supp:-$group}" \
    env ROTATOR_CONFIG="$config" /run/pkg/rotator $args >/dev/null 2>/run/signer.log) &
  signer=$!
  socket=$(echo "$args" | sed -n "s/.*--socket \([^ ]*\).*/\1/p")
  for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.1; done
  stat -c "socket %n %a %U:%G" "$socket" "$(dirname "$socket")" || true
  as_daemon() { setpriv --reuid=rotator --regid=rotator --init-groups "$@"; }
  as_daemon cat /etc/rotator-signer/rotator.toml >/dev/null 2>&1 && echo "daemon reads the signer config"
  as_daemon cat /etc/rotator-signer/ca.key >/dev/null 2>&1 && echo "daemon reads the CA key"
  if as_daemon curl -sS --max-time 5 --unix-socket "$socket" http://signer/v1/ca | grep -q "BEGIN CERTIFICATE"; then
    echo "daemon reaches the signer"
  fi
  if setpriv --reuid=nobody --regid=nogroup --clear-groups curl -sS --max-time 5 \
    --unix-socket "$socket" http://signer/v1/ca >/dev/null 2>&1; then
    echo "nobody reaches the signer"
  fi
  kill "$signer" 2>/dev/null || true
  wait "$signer" 2>/dev/null || true
  sed "s/^/signer log: /" /run/signer.log | head -n 5
' 2>&1); then
  echo "postinst: the sandbox failed:" >&2
  sed 's/^/  /' <<<"$out" >&2
  exit 1
fi

echo "postinst (configure, then configure 0.1.0-1, in a private mount namespace):"
sed 's/^/  /' <<<"$out"
has() { grep -Eq "$1" <<<"$out"; }
uid=$(grep '^rotator:' <<<"$out" | cut -d: -f2)
[[ -n "$uid" && "$uid" -lt 1000 ]] || fail "rotator is not a system user"
has '^rotator:.*:/usr/sbin/nologin$' || fail "rotator can log in"
has '^first /etc/rotator/rotator.toml 640 root:rotator$' || fail "rotator.toml is not 0640 root:rotator after the first configure"
has '^first /etc/rotator-signer/rotator.toml 640 root:rotator-signer$' ||
  fail "the signer's rotator.toml is not 0640 root:rotator-signer after the first configure"
has '^again /etc/rotator/rotator.toml 600 rotator:rotator$' || fail "a reconfigure changed the admin's mode of rotator.toml"
has '^again /etc/rotator-signer/rotator.toml 600 rotator-signer:rotator-signer$' ||
  fail "a reconfigure changed the admin's mode of the signer's rotator.toml"
has '^groups of rotator: (.* )?rotator-socket( |$)' || fail "rotator is not in the group rotator-socket"
has '^groups of rotator: (.* )?rotator-signer( |$)' && fail "rotator is still in the signer's group"
has '^members of rotator-signer: $' || fail "the signer's group has members"
has '^members of rotator-socket: rotator$' || fail "the socket's group has members besides rotator"
has '^/var/lib/rotator 700 rotator:rotator$' || fail "/var/lib/rotator is not 0700 rotator:rotator"
has '^/var/lib/rotator-signer 700 rotator-signer:rotator-signer$' ||
  fail "/var/lib/rotator-signer is not 0700 rotator-signer:rotator-signer"
has 'service enabled$' && fail "a unit was enabled (they must wait for the config)"
has 'deb-systemd-helper' && fail "the systemd snippets complained"
has '^socket /run/rotator/signer.sock 660 rotator-signer:rotator-socket$' ||
  fail "the signer's socket is not 0660 rotator-signer:rotator-socket"
has 'daemon reads the signer config' && fail "the daemon's user reads the signer's config"
has 'daemon reads the CA key' && fail "the daemon's user reads the CA key"
has '^daemon reaches the signer$' || fail "the daemon's user cannot reach the signer's socket"
has '^nobody reaches the signer$' && fail "a user outside rotator-socket reaches the signer's socket"
exit "$failed"
