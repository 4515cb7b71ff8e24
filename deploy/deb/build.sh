#!/usr/bin/env bash
# Builds rotator's Debian package and prints its path (last line of stdout):
#   1. the binary, `cargo build --locked --profile release` (DEB_PROFILE=NAME
#      for another profile; a package is always an optimized build);
#   2. into deploy/deb/build/ (not in git): the systemd units of deploy/ with
#      the packaged binary's path (/usr/bin/rotator), and the completions and
#      man pages that binary generates (`rotator completions SHELL`,
#      `rotator man --dir`), so they match the binary exactly;
#   3. `cargo deb --no-build` (crates.io cargo-deb; deploy/deb/check.sh
#      installs the pinned version), which reads [package.metadata.deb] in
#      Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile="${DEB_PROFILE:-release}"
echo "== cargo build --profile $profile --bin rotator" >&2
cargo build --locked --profile "$profile" --bin rotator >&2
target_dir=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Cargo names the dev profile's directory "debug".
profile_dir="$profile"
[[ "$profile" == dev ]] && profile_dir=debug
bin="$target_dir/$profile_dir/rotator"

out=deploy/deb/build
rm -rf "$out"
mkdir -p "$out/systemd" "$out/completions" "$out/man"
for unit in rotator rotator-signer; do
  sed 's#/usr/local/bin/rotator#/usr/bin/rotator#g' "deploy/$unit.service" >"$out/systemd/$unit.service"
done
"$bin" completions bash >"$out/completions/rotator.bash"
"$bin" completions zsh >"$out/completions/_rotator"
"$bin" completions fish >"$out/completions/rotator.fish"
"$bin" man --dir "$out/man" >&2
# -n: no name or time stamp in the archive, so the same binary makes the same file.
gzip -9n "$out"/man/*.1

echo "== cargo deb --no-build --profile $profile" >&2
# Its last line of output is the path of the .deb.
cargo deb --no-build --profile "$profile" --output "$target_dir/debian/" | tail -n 1
