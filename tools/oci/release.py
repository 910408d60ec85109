"""tools/release: push the service images a change affects, and write their Cloud Run manifests.

    tools/release plan                  build //services/..., list the services whose image digest
                                        differs from the last release (release/digests.json)
    tools/release push [--registry R] [--tag T] [--allow-dirty]
                                        the same, then push those images (each by digest, tagged T,
                                        default release-<commit>) and write release/digests.json and
                                        release/<service>.yaml; unchanged services are not pushed
    tools/release sizes                 image sizes and the bytes only each image has
    tools/release check-impact [--module changenow] [--keep]
                                        in a throwaway copy of the workspace, change one shared
                                        module and check that exactly the images of the services
                                        depending on it change digest
    tools/release check-reproducible    build every image again from nothing (a second output
                                        base: wheels fetched again, base image read again) and
                                        compare digests

A release record maps each service to the image reference (repository@sha256:...) deployed, plus
the one before it: rolling a service back is redeploying that previous reference (tools/oci/README.md).
Runs on the host with its python3, like tools/shared; every build goes through tools/bazel.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from service_config import declared  # beside this file

WS = Path(__file__).resolve().parents[2]
RELEASE_DIR = WS / "release"
IMAGES = 'kind("_oci_image", //services/...)'
# Cloud Run: one gunicorn worker with 8 threads per instance (telepay_shared.web), so 8 requests
# at a time; the legacy deployment's 60 s request timeout (spec §1); PORT comes from containerPort.
CONCURRENCY, TIMEOUT_S, PORT = 8, 60, 8080
RESERVED_ENV = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}


def say(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- Bazel


class Bazel:
    """tools/bazel of one workspace, optionally with a startup option (e.g. another output base)."""

    def __init__(self, workspace: Path = WS, startup: tuple[str, ...] = ()):
        self.workspace, self.startup = workspace, list(startup)

    def __call__(self, *args: str, quiet: bool = True) -> str:
        command = [str(self.workspace / "tools/bazel"), *self.startup, *args]
        result = subprocess.run(command, cwd=self.workspace, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if quiet else None)
        if result.returncode != 0:
            sys.exit(f"tools/release: {' '.join(args[:2])} failed:\n{(result.stderr or '')[-3000:]}")
        return result.stdout

    def image_digests(self, extra: tuple[str, ...] = ()) -> dict[str, str]:
        """Builds every service image; {service: sha256:...}."""
        # Leave the workspace's bazel-* links alone: they may belong to another output base.
        flags = ["--experimental_convenience_symlinks=ignore", *extra]
        labels = self("query", IMAGES, "--output=label").split()
        self("build", *flags, *labels, quiet=False)
        execroot = Path(self("info", *flags, "execution_root").strip())
        files = self("cquery", *flags, "--output=files", " + ".join(f"{label}.digest" for label in labels)).split()
        return {Path(f).parent.name: (execroot / f).read_text().strip() for f in files}

    def dependents(self, target: str) -> set[str]:
        """Services whose :server depends on target."""
        # cquery: the configured graph, without the Java tools a plain query drags in (ijar, zlib).
        found = self("cquery", "--experimental_convenience_symlinks=ignore",
                     f"kind(py_binary, rdeps(//services/..., {target}))").split()
        return {label.split(":")[0].rsplit("/", 1)[-1] for label in found if label.endswith(":server")}


# ---------------------------------------------------------------- Cloud Run manifests


def _yaml(value, indent: int = 0) -> str:
    """Block YAML for dicts and lists; scalars and empty containers as JSON, which YAML reads."""
    pad = "  " * indent

    def nested(item) -> bool:
        return isinstance(item, (dict, list)) and bool(item)

    if isinstance(value, dict):
        return "\n".join(f"{pad}{key}:\n{_yaml(item, indent + 1)}" if nested(item) else f"{pad}{key}: {json.dumps(item)}"
                         for key, item in value.items())
    items = [_yaml(item, indent + 1).lstrip() if nested(item) else json.dumps(item) for item in value]
    return "\n".join(f"{pad}- {item}" for item in items)


def cloud_run_service(service: str, image: str, declaration: dict, environment: dict) -> tuple[str, list[str]]:
    """A Knative Service manifest for `gcloud run services replace`, and the values still missing.

    environment.json says how each declared name gets its value, service by service
    ("services".<service>) over the common sections: "secrets" maps a name to a Secret Manager
    secret ("name" or "name:version", version default latest), delivered by reference
    (secretKeyRef), never as a value; "env" gives plain values. A secret the service declares is
    always a reference (by default to the secret of its own name) unless it is optional and not
    mapped. A name with a default in the declaration may be left out; PORT is Cloud Run's.
    """
    own = environment.get("services", {}).get(service, {})
    values = {**environment.get("env", {}), **own.get("env", {})}
    references = {**environment.get("secrets", {}), **own.get("secrets", {})}
    secrets, plain = declared(declaration)
    env, missing = [], []
    for name, spec in {**plain, **secrets}.items():
        if name in RESERVED_ENV:
            continue
        if name in references or (name in secrets and not spec.get("optional")):
            secret, _, version = str(references.get(name, name)).partition(":")
            env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": version or "latest"}}})
        elif name in values and name not in secrets:
            env.append({"name": name, "value": str(values[name])})
        elif "default" not in spec and not spec.get("optional"):
            missing.append(name)
    template_spec = {"containerConcurrency": CONCURRENCY, "timeoutSeconds": TIMEOUT_S}
    account = own.get("service_account") or environment.get("service_account")
    if account:
        template_spec["serviceAccountName"] = account
    template_spec["containers"] = [{"image": image, "ports": [{"name": "http1", "containerPort": PORT}], "env": env}]
    manifest = {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": own.get("name", service),
                     "labels": {"cloud.googleapis.com/location": environment.get("region", "")}},
        "spec": {"template": {"spec": template_spec}},
    }
    header = f"# Written by tools/release: deploy with `gcloud run services replace release/{service}.yaml`.\n"
    return header + _yaml(manifest) + "\n", missing


# ---------------------------------------------------------------- release


def read_json(path: Path, default):
    return json.loads(path.read_text()) if path.exists() else default


def changed_services(digests: dict[str, str], record: dict) -> list[str]:
    """Services whose built digest differs from the recorded one (or that have none yet)."""
    released = record.get("services", {})
    return sorted(s for s, d in digests.items() if released.get(s, {}).get("digest") != d)


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(WS), *args], check=True, capture_output=True, text=True).stdout.strip()


def plan(args, bazel: Bazel) -> tuple[dict[str, str], list[str], dict, dict[str, dict]]:
    """Builds; prints each service's digest and whether it changed; checks deployment values."""
    digests = bazel.image_digests()
    record = read_json(args.release_dir / "digests.json", {"services": {}})
    changed = changed_services(digests, record)
    environment = read_json(args.release_dir / "environment.json", {})
    declarations = {s: json.loads((WS / "services" / s / "service_config.json").read_text()) for s in digests}
    for service in sorted(digests):
        missing = cloud_run_service(service, "", declarations[service], environment)[1]
        gaps = f"  (no value for {', '.join(missing)})" if missing else ""
        say(f"{service:24} {digests[service]}  {'CHANGED' if service in changed else 'unchanged'}{gaps}")
    return digests, changed, record, declarations


def cmd_plan(args, bazel: Bazel) -> None:
    plan(args, bazel)


def cmd_push(args, bazel: Bazel) -> None:
    if git("status", "--porcelain") and not args.allow_dirty:
        sys.exit("tools/release: the working tree has uncommitted changes; commit first (or --allow-dirty)")
    digests, changed, record, declarations = plan(args, bazel)
    environment = read_json(args.release_dir / "environment.json", {})
    if any(cloud_run_service(s, "", declarations[s], environment)[1] for s in digests):
        sys.exit(f"tools/release: nothing pushed; give the values listed above in {args.release_dir}/environment.json")
    tag = args.tag or f"release-{git('rev-parse', '--short=12', 'HEAD')}"
    services = record.setdefault("services", {})
    for service in changed:
        push = ["run", f"//services/{service}:push", "--", "--tag", tag]
        push += ["--repository", f"{args.registry}/{service}"] if args.registry else []
        reference = bazel(*push).splitlines()[-1].strip()
        services[service] = {"digest": digests[service], "image": reference,
                             "previous": services.get(service, {}).get("image")}
        say(f"pushed {reference}")
    for service in sorted(digests):
        text, _ = cloud_run_service(service, services[service]["image"], declarations[service], environment)
        (args.release_dir / f"{service}.yaml").write_text(text)
    record["shared_pin"] = git("rev-parse", "HEAD:shared")
    (args.release_dir / "digests.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    say(f"pushed {len(changed)} of {len(digests)} images; wrote {args.release_dir}/digests.json and <service>.yaml")


# ---------------------------------------------------------------- sizes


def image_layers(layout: Path) -> list[tuple[str, int]]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / index["manifests"][0]["digest"].replace(":", "/")).read_text())
    return [(layer["digest"], layer["size"]) for layer in manifest["layers"]]


def cmd_sizes(args, bazel: Bazel) -> None:
    digests = bazel.image_digests()
    execroot = Path(bazel("info", "--experimental_convenience_symlinks=ignore", "execution_root").strip())
    paths = bazel("cquery", "--experimental_convenience_symlinks=ignore", "--output=files", IMAGES).split()
    layers = {Path(p).parent.name: image_layers(execroot / p) for p in paths}
    uses: dict[str, int] = {}
    for blobs in layers.values():
        for digest, _ in blobs:
            uses[digest] = uses.get(digest, 0) + 1
    print(f"{'service':24} {'layers':>6} {'compressed':>12} {'unique':>12}")
    for service in sorted(layers):
        blobs = layers[service]
        unique = sum(size for digest, size in blobs if uses[digest] == 1)
        print(f"{service:24} {len(blobs):>6} {sum(s for _, s in blobs) / 1e6:>10.2f}MB {unique / 1e3:>10.1f}kB")
    total = sum(size for blobs in layers.values() for _, size in blobs) / 1e6
    distinct = sum({digest: size for blobs in layers.values() for digest, size in blobs}.values()) / 1e6
    print(f"{len(layers)} images: {total:.1f} MB if stored apart, {distinct:.1f} MB in one registry")


# ---------------------------------------------------------------- checks in a second build


def _scratch(bazel: Bazel, name: str) -> Path:
    """A new folder beside Bazel's output bases: under tools/bazel it is visible at the same path
    inside the build environment, so a workspace there needs no mount of its own."""
    output_user_root = Path(bazel("info", "output_base").strip()).parent
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=output_user_root))


def _discard(bazel: Bazel, *folders: Path) -> None:
    """Deletes a second build's output base (and folders), and stops its Bazel server."""
    output_base = Path(bazel("info", "output_base").strip())
    bazel("clean", "--expunge")
    bazel("shutdown")
    for folder in (output_base, *folders):
        shutil.rmtree(folder, ignore_errors=True)


def cmd_check_reproducible(args, bazel: Bazel) -> None:
    first = bazel.image_digests()
    clean = Bazel(WS, (f"--output_base={_scratch(bazel, 'reproducible')}",))
    say("building every image again in an empty output base (wheels fetched again; a few minutes)")
    try:
        second = clean.image_digests()
    finally:
        _discard(clean)
    differ = sorted(s for s in first if first[s] != second.get(s))
    for service in sorted(first):
        say(f"{service:24} {first[service]}  {'DIFFERS: ' + str(second.get(service)) if service in differ else 'same'}")
    if differ:
        sys.exit(f"tools/release: not reproducible: {', '.join(differ)}")
    print(f"{len(first)} images, identical digests from two clean builds")


def _copy_workspace(destination: Path) -> None:
    """The working tree without its Bazel links and git objects (shared/.git, a link file, stays)."""
    def ignore(directory: str, names: list[str]) -> list[str]:
        top = Path(directory) == WS
        return [n for n in names if n.startswith("bazel-") or (top and n in (".git", ".dev"))]
    shutil.copytree(WS, destination, symlinks=True, ignore=ignore)


def cmd_check_impact(args, bazel: Bazel) -> None:
    module = WS / "shared" / "telepay_shared" / f"{args.module}.py"
    if not module.exists():
        sys.exit(f"tools/release: no shared module {module}")
    expected = bazel.dependents(f"//shared:{args.module}")
    copy = _scratch(bazel, "impact")
    _copy_workspace(copy / "ws")
    other = Bazel(copy / "ws")
    say(f"building every image in a throwaway copy {copy}/ws (its own output base: a few minutes)")
    try:
        before = other.image_digests()
        # A throwaway pin: what a bump does to the checkout, one changed line in one module.
        changed_file = copy / "ws" / module.relative_to(WS)
        changed_file.write_text(changed_file.read_text() + "\n# tools/release check-impact: a throwaway change\n")
        after = other.image_digests()
    finally:
        if not args.keep:
            _discard(other, copy)
    changed = {s for s in before if before[s] != after.get(s)}
    for service in sorted(before):
        relation = "depends on" if service in expected else "does not depend on"
        say(f"{service:24} {'changed' if service in changed else 'same':8} {relation} //shared:{args.module}")
    if changed != expected:
        sys.exit(f"tools/release: expected exactly {sorted(expected)} to change, got {sorted(changed)}")
    print(f"a change to //shared:{args.module} changed exactly its {len(changed)} dependents' images")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="tools/release", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("plan", "push"):
        command = commands.add_parser(name)
        command.add_argument("--release-dir", type=Path, default=RELEASE_DIR,
                             help="the release record, environment.json and manifests (default %(default)s)")
    push = commands.choices["push"]
    push.add_argument("--registry", help="push to R/<service> instead of tools/oci/service_image.bzl's REGISTRY")
    push.add_argument("--tag", help="tag for the pushed images (default release-<commit>)")
    push.add_argument("--allow-dirty", action="store_true")
    commands.add_parser("sizes")
    impact = commands.add_parser("check-impact")
    impact.add_argument("--module", default="changenow", help="shared module to change (default %(default)s)")
    impact.add_argument("--keep", action="store_true", help="keep the copy and its output base")
    commands.add_parser("check-reproducible")
    args = parser.parse_args(argv)
    handler = {"plan": cmd_plan, "push": cmd_push, "sizes": cmd_sizes, "check-impact": cmd_check_impact,
               "check-reproducible": cmd_check_reproducible}[args.command]
    handler(args, Bazel())


if __name__ == "__main__":
    main(sys.argv[1:])
