"""A py_binary as image layers: its runfiles tree, mapped file by file under one root (/app).

The layout under the root is the runfiles tree Bazel itself runs and tests the binary from
(<repository>/<path>, e.g. app/_main/services/gcsplit2/app.py and
app/rules_python~~pip~pypi_flask/site-packages/flask/...), so files of different wheels never
collide, unlike pkg_tar's include_runfiles, which flattens them.
"""

load("@rules_python//python:defs.bzl", "PyInfo")
load(":defs.bzl", "runfiles_path")

ROOT = "/app"

# The image's interpreter (python_base: Debian's python3.14, the build environment's own), and
# the cache tag of the bytecode the layers carry for it (pyc.py).
PYTHON = "/usr/bin/python3"
PYC_CACHE_TAG = "cpython-314"

# The Python toolchain's wrapper script: the image brings its own interpreter.
_DROPPED_REPOSITORIES = ["bazel_tools"]

def _repository(path):
    return path.split("/", 1)[0]

def _runfiles_entries(ctx, target):
    """[runfiles path, source File or None (an empty file)] for a target's default runfiles."""
    runfiles = target[DefaultInfo].default_runfiles
    executable = target[DefaultInfo].files_to_run.executable
    entries = [[runfiles_path(ctx, f), f] for f in runfiles.files.to_list() if f != executable]
    entries += [[ctx.workspace_name + "/" + s.path, s.target_file] for s in runfiles.symlinks.to_list()]
    entries += [[s.path, s.target_file] for s in runfiles.root_symlinks.to_list()]
    entries += [[ctx.workspace_name + "/" + name, None] for name in runfiles.empty_filenames.to_list()]
    return [e for e in entries if _repository(e[0]) not in _DROPPED_REPOSITORIES]

def _runfiles_layer_impl(ctx):
    excluded = {}
    for target in ctx.attr.exclude:
        for path, _ in _runfiles_entries(ctx, target):
            excluded[_repository(path)] = True
    main = ctx.attr.repositories == "main"
    pairs, sources = {}, []
    for target in ctx.attr.srcs:
        for path, source in _runfiles_entries(ctx, target):
            repository = _repository(path)
            if (repository == ctx.workspace_name) == main and repository not in excluded:
                pairs[ctx.attr.root.strip("/") + "/" + path] = source.path if source else None
                if source:
                    sources.append(source)
    manifest = ctx.actions.declare_file(ctx.label.name + ".files.json")
    ctx.actions.write(manifest, json.encode(sorted(pairs.items())))
    layer = ctx.actions.declare_file(ctx.label.name + ".tar.gz")
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = ["layer", "--manifest", manifest.path, "--out", layer.path] +
                    (["--pyc-cache-tag", ctx.attr.pyc_cache_tag] if ctx.attr.pyc_cache_tag else []),
        inputs = depset([manifest] + sources),
        outputs = [layer],
        mnemonic = "RunfilesLayer",
        progress_message = "Layer %{label}",
    )
    # The sources as runfiles, at the paths the layer gives them (minus root): a test can rebuild it.
    return [DefaultInfo(files = depset([layer]), runfiles = ctx.runfiles(sources))]

runfiles_layer = rule(
    implementation = _runfiles_layer_impl,
    attrs = {
        "srcs": attr.label_list(mandatory = True, doc = "Targets whose runfiles go into the layer."),
        "repositories": attr.string(
            mandatory = True,
            values = ["main", "external"],
            doc = "main: this workspace's files (first-party code); external: every other repository's.",
        ),
        "exclude": attr.label_list(doc = "Leave out every repository that these targets' runfiles hold."),
        "root": attr.string(default = ROOT),
        "pyc_cache_tag": attr.string(default = PYC_CACHE_TAG, doc = "Bytecode for this interpreter; empty: none."),
        "_tool": attr.label(default = "//tools/oci:layout", executable = True, cfg = "exec"),
    },
    doc = "A reproducible .tar.gz of part of some targets' runfiles trees, placed under `root`.",
)

def _py_image_env_impl(ctx):
    # What the py_binary's launcher would put on sys.path: its imports, then the main
    # repository's root (for `from services.x import ...`); PYTHONSAFEPATH=1 as the launcher sets.
    imports = ctx.attr.binary[PyInfo].imports.to_list() + [ctx.workspace_name]
    env = ctx.actions.declare_file(ctx.label.name + ".env")
    ctx.actions.write(env, "PYTHONPATH=%s\nPYTHONSAFEPATH=1\n" % ":".join([ctx.attr.root + "/" + i for i in imports]))
    return [DefaultInfo(files = depset([env]))]

py_image_env = rule(
    implementation = _py_image_env_impl,
    attrs = {
        "binary": attr.label(mandatory = True, providers = [PyInfo]),
        "root": attr.string(default = ROOT),
    },
    doc = "A KEY=VALUE file (oci_image's env) running the binary's main file like its launcher does.",
)
