"""debian_rootfs: a repository holding a root filesystem layer made of installed Debian packages.

The packages are read from the machine Bazel runs on, which here is always the pinned Debian sid
build environment (tools/bazel), so the image's CPython is the one the wheels were resolved and
tested with. The repository is fetched again whenever dpkg's database changes (a package
installed, upgraded or removed) or the tool changes. See tools/oci/README.md, also for using a
registry base image pinned by digest instead.
"""

_DPKG_STATUS = "/var/lib/dpkg/status"

def _debian_rootfs_impl(rctx):
    tool = rctx.path(Label("//tools/oci:debian_rootfs.py"))
    for watched in [_DPKG_STATUS, tool] + [rctx.path(Label("//tools/oci:%s.py" % m)) for m in ("pyc", "tarball")]:
        rctx.watch(watched)
    python = rctx.which("python3") or fail("debian_rootfs: python3 is not on PATH")
    args = [python, tool, "--out", "rootfs.tar.gz", "--versions-out", "packages.txt"]
    if rctx.attr.pyc_cache_tag:
        args += ["--pyc-cache-tag", rctx.attr.pyc_cache_tag]
    for package in rctx.attr.packages:
        args += ["--package", package]
    for package in rctx.attr.exclude:
        args += ["--exclude", package]
    result = rctx.execute(args, quiet = True)
    if result.return_code != 0:
        fail("debian_rootfs failed:\n" + result.stderr)
    rctx.file("BUILD.bazel", 'exports_files(["rootfs.tar.gz", "packages.txt"])\n')

debian_rootfs = repository_rule(
    implementation = _debian_rootfs_impl,
    attrs = {
        "packages": attr.string_list(mandatory = True, doc = "Packages to install, with their dependencies."),
        "exclude": attr.string_list(doc = "Dependencies to leave out (needed only by maintainer scripts)."),
        "pyc_cache_tag": attr.string(doc = "Compile the packages' Python files for this interpreter (cpython-314)."),
    },
    doc = "@<name>//:rootfs.tar.gz (a gzip layer) and @<name>//:packages.txt (name=version lines).",
)
