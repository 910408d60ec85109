# The offline build environment behind tools/bazel: a Debian sid root with Debian's Bazel 7.7.1.
# Sourced by tools/bazel (and tools/dev); defines buildenv_ensure, buildenv_exec.
#
# Layout under $TELEPAY_BUILDENV_DIR (default /var/cache/telepay-buildenv):
#   lock          flock(1) lock: one bootstrap at a time, concurrent callers wait
#   sid/          the root, moved into place only once debootstrap has finished
#   sid/.telepay-ready  hash of the recipe the root was last completed for
#   tmp.*         a half-built root of an interrupted run; removed by the next run
# The package layer is re-applied whenever the recipe (packages.txt, bootstrap-wheels.txt,
# buildenv_layer_version) changes, and it is idempotent, so an interrupted run is finished by the next one.

buildenv_dir=${TELEPAY_BUILDENV_DIR:-/var/cache/telepay-buildenv}
buildenv_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)

# Bump when _buildenv_layer changes what it puts into the root.
readonly buildenv_layer_version=2

_buildenv_recipe_hash() {
  { echo "$buildenv_layer_version"; cat "$buildenv_here/packages.txt" "$buildenv_here/bootstrap-wheels.txt"; } \
    | sha256sum | cut -c1-16
}

_buildenv_packages() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$buildenv_here/packages.txt"; }

# The Debian mirror this host's apt already uses, so that nothing names a mirror of its own.
_buildenv_mirror() {
  if [[ -n "${TELEPAY_DEBIAN_MIRROR:-}" ]]; then echo "$TELEPAY_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/{for(i=2;i<=NF;i++) print $i}' \
        | grep -E '/debian/?$' | head -n1)
  [[ -n "$uri" ]] || uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n1)
  [[ -n "$uri" ]] || die "no Debian mirror found in this host's apt sources." \
      "Fix: set TELEPAY_DEBIAN_MIRROR to a Debian mirror URL that serves 'sid'."
  echo "$uri"
}

# Bazel's output user root (--output_user_root): beside the root, not in it.
buildenv_outputs() { echo "$buildenv_dir/outputs"; }

# The mounts the root needs (/proc, /dev, /sys, Bazel's outputs, each workspace) live in ONE
# private mount namespace kept in the file ns/mnt, so they never show on the host and every
# tools/bazel enters the same one: the Bazel server started by one call then looks, to the
# next call, as if it ran where that call runs (Bazel restarts a server whose working directory
# it cannot recognise). The host sees only the namespace file's own mount.
_buildenv_namespace() {
  local root=$1 ns_dir="$buildenv_dir/ns"
  nsenter --mount="$ns_dir/mnt" true 2>/dev/null && return
  exec 8>"$buildenv_dir/ns.lock"; flock 8
  if ! nsenter --mount="$ns_dir/mnt" true 2>/dev/null; then
    mkdir -p "$ns_dir" "$(buildenv_outputs)"
    # A namespace can only be kept in a file on a private mount.
    mountpoint -q "$ns_dir" || mount --bind "$ns_dir" "$ns_dir"
    mount --make-private "$ns_dir"
    umount "$ns_dir/mnt" 2>/dev/null || true
    : >"$ns_dir/mnt"
    unshare --mount="$ns_dir/mnt" --propagation private true \
      || die "could not create a private mount namespace (unshare --mount)." \
             "Fix: run tools/bazel as root on a kernel that allows mount namespaces."
    nsenter --mount="$ns_dir/mnt" /bin/sh -ec '
      root=$1 outputs=$2
      mount -t proc proc "$root/proc"
      mount --rbind /dev "$root/dev"
      mount --rbind /sys "$root/sys"
      # Bazel outputs live outside the root at the same absolute path inside and out, so the
      # bazel-bin / bazel-testlogs links in a workspace work from the host too.
      mkdir -p "$root$outputs"; mount --bind "$outputs" "$root$outputs"' _ "$root" "$(buildenv_outputs)"
  fi
  exec 8>&-
}

# Run a command inside the root, in that namespace, with workspace WS (if any) mounted at its
# own absolute path and the working directory CWD.
buildenv_exec() {
  local root=$1 ws=$2 cwd=$3; shift 3
  local -a keep=(HOME=/root USER=root LANG=C.UTF-8 TZ=UTC
                 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
  local name
  for name in TERM COLUMNS CI http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [[ -n "${!name:-}" ]] && keep+=("$name=${!name}")
  done
  while IFS= read -r name; do keep+=("$name=${!name}"); done < <(compgen -e | grep -E '^TELEPAY_' || true)
  _buildenv_namespace "$root"
  # The workspace is (re)mounted when it is missing or is no longer the same folder (a clone
  # deleted and made again at the same path); the flock keeps concurrent calls from stacking mounts.
  exec nsenter --mount="$buildenv_dir/ns/mnt" /bin/bash -c '
    set -e
    root=$1 ws=$2 cwd=$3 lock=$4; shift 4
    if [[ -n "$ws" ]]; then
      exec 8>"$lock"; flock 8
      if [[ "$(stat -c %d:%i "$ws")" != "$(stat -c %d:%i "$root$ws" 2>/dev/null)" ]]; then
        umount -l "$root$ws" 2>/dev/null || true
        mkdir -p "$root$ws"; mount --bind "$ws" "$root$ws"
      fi
      exec 8>&-
    fi
    n=$1; shift
    env=("${@:1:$n}"); shift "$n"
    exec chroot "$root" /usr/bin/env -i "${env[@]}" /bin/sh -c "cd \"\$0\" && exec \"\$@\"" "$cwd" "$@"
  ' _ "$root" "$ws" "$cwd" "$buildenv_dir/ns.lock" "${#keep[@]}" "${keep[@]}" "$@"
}

_buildenv_in() {  # run a bootstrap step inside the root, without the workspace, as a child
  local root=$1; shift
  ( buildenv_exec "$root" "" / "$@" )
}

_buildenv_base() {  # debootstrap into a temporary folder, then move it into place in one step
  local root=$1 mirror tmp log
  command -v debootstrap >/dev/null || {
    say "installing debootstrap on the host (apt-get install debootstrap)"
    { apt-get update -q && apt-get install -y -q debootstrap; } >&2 \
      || die "debootstrap is missing and apt-get could not install it." \
             "Fix: apt-get update && apt-get install -y debootstrap, then run tools/bazel again."
  }
  mirror=$(_buildenv_mirror)
  rm -rf "$buildenv_dir"/tmp.*
  # A namespace made for a previous root would keep that root's mounts: start a new one.
  umount "$buildenv_dir/ns/mnt" 2>/dev/null || true
  tmp=$(mktemp -d "$buildenv_dir/tmp.XXXXXX")
  chmod 755 "$tmp"  # it becomes "/": unprivileged users inside (PostgreSQL) must traverse it
  log="$buildenv_dir/debootstrap.log"
  say "debootstrap sid from $mirror into $tmp (about a minute; log: $log)"
  if ! debootstrap --variant=minbase --include=ca-certificates sid "$tmp" "$mirror" >"$log" 2>&1; then
    rm -rf "$tmp"
    die "debootstrap of Debian sid failed (last lines of $log below)." \
        "$(tail -n 5 "$log")" \
        "Fix: make the Debian mirror $mirror reachable, or set TELEPAY_DEBIAN_MIRROR to one that is."
  fi
  mv -T "$tmp" "$root"
}

_buildenv_layer() {  # packages, certificates and Bazel settings; idempotent
  local root=$1 stamp=$2 pkgs
  mkdir -p "$root/etc/apt/apt.conf.d" "$root/usr/local/share/ca-certificates" "$root/opt/telepay"
  chmod 755 "$root"
  # The mirror is a frozen snapshot whose sid Release file is past its Valid-Until date.
  echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99telepay-no-valid-until"
  # Outbound TLS may pass an inspecting proxy: trust what the host trusts.
  cp -f /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp -fL /etc/resolv.conf "$root/etc/resolv.conf"
  mapfile -t pkgs < <(_buildenv_packages)
  say "installing ${#pkgs[*]} Debian packages into the build environment (about two minutes)"
  _buildenv_in "$root" /bin/sh -c '
    export DEBIAN_FRONTEND=noninteractive
    dpkg --configure -a && apt-get update -q && apt-get install -y -q -f &&
    apt-get install -y -q --no-install-recommends "$@" && update-ca-certificates' _ "${pkgs[@]}" \
    >"$buildenv_dir/apt.log" 2>&1 \
    || die "installing packages in the build environment failed (last lines of $buildenv_dir/apt.log below)." \
           "$(tail -n 5 "$buildenv_dir/apt.log")" \
           "Fix: check that the Debian mirror serves these packages, then run tools/bazel again."
  local wheel name
  cp -f "$buildenv_here/bootstrap-wheels.txt" "$root/opt/telepay/bootstrap-wheels.txt"
  _buildenv_in "$root" /bin/sh -c '
    set -e; rm -rf /opt/telepay/wheels; mkdir -p /opt/telepay/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: --require-hashes \
      -r /opt/telepay/bootstrap-wheels.txt -d /opt/telepay/wheels' >"$buildenv_dir/wheels.log" 2>&1 \
    || die "downloading the pip/setuptools wheels failed (see $buildenv_dir/wheels.log)." \
           "Fix: make PyPI reachable for pip, then run tools/bazel again."
  for wheel in "$root"/opt/telepay/wheels/*.whl; do
    name=$(basename "$wheel"); name=${name%%-*}
    rm -rf "$root/opt/telepay/$name.tmp"
    python3 -m zipfile -e "$wheel" "$root/opt/telepay/$name.tmp" 2>/dev/null \
      || _buildenv_in "$root" python3 -m zipfile -e "/opt/telepay/wheels/$(basename "$wheel")" "/opt/telepay/$name.tmp"
    cp "$buildenv_here/wheel.BUILD.bazel" "$root/opt/telepay/$name.tmp/BUILD.bazel"
    : >"$root/opt/telepay/$name.tmp/WORKSPACE"
    rm -rf "$root/opt/telepay/$name"; mv -T "$root/opt/telepay/$name.tmp" "$root/opt/telepay/$name"
  done
  # Inside this root Bazel is always offline: select the .bazelrc config that says how.
  printf '%s\n' '# Written by tools/bazel_offline/buildenv.sh: this root has no Bazel Central Registry.' \
    'common --config=offline' >"$root/root/.bazelrc"
  echo "$stamp" >"$root/.telepay-ready"
}

# Print the root folder, building or completing it first when needed.
buildenv_ensure() {
  local root="$buildenv_dir/sid" stamp
  [[ $(id -u) == 0 ]] || die "the offline Bazel environment must be built and entered as root" \
      "(debootstrap, chroot and mount need it)." \
      "Fix: run tools/bazel as root, or install bazelisk (it fetches Bazel $BAZEL_VERSION online)."
  stamp=$(_buildenv_recipe_hash)
  if [[ -f "$root/.telepay-ready" && "$(cat "$root/.telepay-ready")" == "$stamp" ]]; then
    echo "$root"; return
  fi
  local tool
  for tool in unshare nsenter chroot mount mountpoint flock sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is missing on this host. Fix: apt-get install -y util-linux coreutils"
  done
  mkdir -p "$buildenv_dir"
  exec 9>"$buildenv_dir/lock"
  if ! flock -n 9; then
    say "another tools/bazel is building the environment; waiting for it"
    flock 9
  fi
  if [[ ! -f "$root/.telepay-ready" || "$(cat "$root/.telepay-ready")" != "$stamp" ]]; then
    say "first run: building the offline Bazel $BAZEL_VERSION environment in $root (a few minutes; later runs reuse it)"
    [[ -d "$root" ]] || _buildenv_base "$root"
    _buildenv_layer "$root" "$stamp"
    say "build environment ready"
  fi
  exec 9>&-
  echo "$root"
}
