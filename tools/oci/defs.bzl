"""oci_image, oci_push, oci_load: a small stand-in for rules_oci, with its names and attributes.

rules_oci cannot be fetched here (no Bazel Central Registry, no GitHub), so these build standard
OCI image layouts with a Python tool (layout.py) and push with the crane of the build environment.
With internet access, `bazel_dep(name = "rules_oci", ...)` and changing the load line to
`load("@rules_oci//oci:defs.bzl", "oci_image", "oci_load", "oci_push")` switches over; the
differences are listed in tools/oci/README.md.
"""

def runfiles_path(ctx, file):
    """Where a file sits under a runfiles root: <repository>/<path>."""
    if file.short_path.startswith("../"):
        return file.short_path[3:]
    return ctx.workspace_name + "/" + file.short_path

def _layout_dir(target):
    dirs = [f for f in target[DefaultInfo].files.to_list() if f.is_directory]
    if len(dirs) != 1:
        fail("%s is not an OCI image layout (expected one directory)" % target.label)
    return dirs[0]

def _oci_image_impl(ctx):
    layout = ctx.actions.declare_directory(ctx.label.name)
    options = ctx.outputs.options
    ctx.actions.write(options, json.encode(struct(
        entrypoint = ctx.attr.entrypoint,
        cmd = ctx.attr.cmd,
        env = ctx.attr.env,
        user = ctx.attr.user,
        workdir = ctx.attr.workdir,
        labels = ctx.attr.labels,
        annotations = ctx.attr.annotations,
        exposed_ports = ctx.attr.exposed_ports,
        os = ctx.attr.os,
        architecture = ctx.attr.architecture,
    )))
    args = ctx.actions.args()
    args.add("image").add("--options", options).add("--out", layout.path).add("--digest", ctx.outputs.digest)
    inputs = [options] + ctx.files.tars + ctx.files.env_files
    if ctx.attr.base:
        base = _layout_dir(ctx.attr.base)
        args.add("--base", base.path)
        inputs.append(base)
    args.add_all(ctx.files.tars, before_each = "--layer")
    args.add_all(ctx.files.env_files, before_each = "--env-file")
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = inputs,
        outputs = [layout, ctx.outputs.digest],
        mnemonic = "OciImage",
        progress_message = "OCI image %{label}",
    )
    return [DefaultInfo(files = depset([layout]))]

_oci_image = rule(
    implementation = _oci_image_impl,
    attrs = {
        "base": attr.label(doc = "An oci_image (or any target giving one OCI layout directory)."),
        "tars": attr.label_list(allow_files = True, doc = "Layers, in order: tar or tar.gz files."),
        "entrypoint": attr.string_list(),
        "cmd": attr.string_list(),
        "env": attr.string_dict(doc = "Values may use the base image's $VARIABLES, e.g. $PATH."),
        "env_files": attr.label_list(allow_files = True, doc = "KEY=VALUE lines, before env."),
        "user": attr.string(),
        "workdir": attr.string(),
        "labels": attr.string_dict(),
        "annotations": attr.string_dict(),
        "exposed_ports": attr.string_list(),
        "os": attr.string(),
        "architecture": attr.string(),
        "_tool": attr.label(default = "//tools/oci:layout", executable = True, cfg = "exec"),
    },
    # name.options.json: the attributes above as the tool reads them (a test rebuilds from it).
    outputs = {"digest": "%{name}.digest", "options": "%{name}.options.json"},
)

def oci_image(name, env = None, **kwargs):
    """An OCI image layout directory `name`, and `name.digest` (sha256:... of its manifest).

    As rules_oci: `env` is a dict or the label of a file of KEY=VALUE lines.
    """
    if type(env) == "dict":
        kwargs["env"] = env
    elif env:
        kwargs["env_files"] = [env]
    _oci_image(name = name, **kwargs)

def _launcher(ctx, tool, args):
    """An executable running `tool args "$@"` from this target's runfiles (bazel run, or a test's data)."""
    launcher = ctx.actions.declare_file(ctx.label.name + ".sh")
    ctx.actions.write(launcher, is_executable = True, content = "\n".join([
        "#!/usr/bin/env bash",
        "set -euo pipefail",
        'runfiles="${RUNFILES_DIR:-$0.runfiles}"',
        'exec "$runfiles/%s" %s "$@"' % (runfiles_path(ctx, tool), " ".join(args)),
        "",
    ]))
    return launcher

def _oci_push_impl(ctx):
    image = _layout_dir(ctx.attr.image)
    args = ['--image "$runfiles/%s"' % runfiles_path(ctx, image), "--repository " + ctx.attr.repository]
    args += ["--tag " + tag for tag in ctx.attr.remote_tags]
    launcher = _launcher(ctx, ctx.executable._tool, args)
    runfiles = ctx.runfiles([image]).merge(ctx.attr._tool[DefaultInfo].default_runfiles)
    return [DefaultInfo(executable = launcher, runfiles = runfiles)]

oci_push = rule(
    implementation = _oci_push_impl,
    attrs = {
        "image": attr.label(mandatory = True),
        "repository": attr.string(mandatory = True, doc = "e.g. europe-docker.pkg.dev/project/repo/name"),
        "remote_tags": attr.string_list(),
        "_tool": attr.label(default = "//tools/oci:push", executable = True, cfg = "target"),
    },
    executable = True,
    doc = "`bazel run` pushes the image by digest with crane, tags it, prints repository@digest. " +
          "Arguments: --repository R (instead of the default), --tag T (repeatable), others go to crane.",
)

def _oci_load_impl(ctx):
    image = _layout_dir(ctx.attr.image)
    tarball = ctx.actions.declare_file(ctx.label.name + ".tar")
    args = ctx.actions.args()
    args.add("load").add("--image", image.path).add("--out", tarball)
    args.add_all(ctx.attr.repo_tags, before_each = "--repo-tag")
    ctx.actions.run(
        executable = ctx.executable._tool,
        arguments = [args],
        inputs = [image],
        outputs = [tarball],
        mnemonic = "OciLoad",
        progress_message = "Image tarball %{label}",
    )
    launcher = _launcher(ctx, ctx.executable._loader, ['"$runfiles/%s"' % runfiles_path(ctx, tarball)])
    runfiles = ctx.runfiles([tarball]).merge(ctx.attr._loader[DefaultInfo].default_runfiles)
    return [
        DefaultInfo(files = depset([tarball, launcher]), executable = launcher, runfiles = runfiles),
        OutputGroupInfo(tarball = depset([tarball])),
    ]

oci_load = rule(
    implementation = _oci_load_impl,
    attrs = {
        "image": attr.label(mandatory = True),
        "repo_tags": attr.string_list(doc = "e.g. telepay/gcsplit2:latest"),
        "_tool": attr.label(default = "//tools/oci:layout", executable = True, cfg = "exec"),
        "_loader": attr.label(default = "//tools/oci:load", executable = True, cfg = "target"),
    },
    executable = True,
    doc = "`bazel build` writes <name>.tar, a `docker save` archive that is also an OCI archive; " +
          "`bazel run` feeds it to `docker load` or `podman load`, whichever exists.",
)
