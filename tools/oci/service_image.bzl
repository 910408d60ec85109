"""service_image: the container image of one service, with :push, :load and a smoke test.

    load("//tools/oci:service_image.bzl", "service_image")
    service_image()

at the end of services/<name>/BUILD.bazel gives //services/<name>:image (and :image.digest),
:push, :load and :image_test, from the package's :server py_binary (main file app.py). Layers:
the Python base (//tools/oci:python_base), the third-party packages every service shares
(//tools/oci:python_deps_layer, identical bytes in every image), this service's other
third-party packages (usually none), then its first-party code: the shared core and the service.
"""

load("@rules_python//python:defs.bzl", "py_test")
load(":defs.bzl", "oci_image", "oci_load", "oci_push")
load(":python.bzl", "PYTHON", "ROOT", "py_image_env", "runfiles_layer")

# The one place the default push destination is set: <REGISTRY>/<service>, an Artifact Registry
# repository in the legacy deployment's project and region (spec §6); `bazel run :push --
# --repository R` and `tools/release push --registry R` override it.
REGISTRY = "us-central1-docker.pkg.dev/telepay-459221/telepay"

_SHARED_DEPS = "//tools/oci:python_deps"

# Images are release artifacts: tools/release and the image tests read them.
_PUBLIC = ["//visibility:public"]

def service_image(name = "image", binary = ":server", main = "app.py", config = "service_config.json", smoke_env = {}):
    """Image, push, load and smoke-test targets for the service in this package.

    Args:
      name: the image target; also names its layers (<name>_app, ...) and test (<name>_test).
      binary: the service's py_binary.
      main: the binary's main file, relative to this package.
      config: the service's configuration declaration; the smoke test fills in dummy values.
      smoke_env: extra environment for the smoke test only (KEY: value).
    """
    package = native.package_name()
    service = package.split("/")[-1]
    runfiles_layer(
        name = name + "_third_party",
        visibility = _PUBLIC,
        srcs = [binary],
        repositories = "external",
        exclude = [_SHARED_DEPS],
    )
    runfiles_layer(
        name = name + "_app",
        visibility = _PUBLIC,
        srcs = [binary],
        repositories = "main",
    )
    py_image_env(
        name = name + "_env",
        visibility = _PUBLIC,
        binary = binary,
    )
    oci_image(
        name = name,
        visibility = _PUBLIC,
        base = "//tools/oci:python_base",
        tars = [
            "//tools/oci:python_deps_layer",
            name + "_third_party",
            name + "_app",
        ],
        # The main repository's runfiles directory is always _main under Bzlmod.
        entrypoint = [PYTHON, "%s/_main/%s/%s" % (ROOT, package, main)],
        env = name + "_env",
        workdir = ROOT + "/_main",
        labels = {"org.opencontainers.image.title": service},
    )
    oci_push(
        name = "push",
        visibility = _PUBLIC,
        image = name,
        repository = "%s/%s" % (REGISTRY, service),
    )
    oci_load(
        name = "load",
        visibility = _PUBLIC,
        image = name,
        repo_tags = ["telepay/%s:latest" % service],
    )
    py_test(
        name = name + "_test",
        srcs = ["//tools/oci:image_smoke_test.py"],
        main = "//tools/oci:image_smoke_test.py",
        args = ["--image $(rootpath %s)" % name, "--config $(rootpath %s)" % config] +
               ["--env %s=%s" % item for item in smoke_env.items()],
        data = [name, config],
        deps = [
            "//shared:testing_postgres",
            "//tools/oci:image_testing",
        ],
        size = "medium",  # about 10 s alone; more while other tests share the machine
    )
