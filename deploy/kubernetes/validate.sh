#!/bin/bash
# Validates every manifest under deploy/kubernetes/ against the Kubernetes API schemas
# (kubernetes-validate --strict: unknown fields are errors), for the newest Kubernetes the
# pinned kubernetes-validate knows and for the oldest this DaemonSet supports (1.30: the first
# with securityContext.appArmorProfile), then runs check.py (the manifests against the
# systemd unit's capabilities and the daemon's config keys).
#
# Needs python3 with venv (Debian: python3-venv; `make k8s-validate` installs it) and PyPI.
# The venv lives in .build-k8s/venv and is rebuilt when requirements.txt changes.
# KUBERNETES_VERSIONS="1.34.0 1.37.0" overrides the versions.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
versions=${KUBERNETES_VERSIONS:-"1.30.0 1.37.0"}
venv=$root/.build-k8s/venv

if ! cmp -s "$here/requirements.txt" "$venv/requirements.txt" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$here/requirements.txt"
    cp "$here/requirements.txt" "$venv/requirements.txt"
fi

cd "$here"
mapfile -t files < <(find . -name '*.yaml' | sed 's|^\./||' | sort)
status=0
for v in $versions; do
    out=$("$venv/bin/kubernetes-validate" --kubernetes-version "$v" --strict "${files[@]}" 2>&1) || status=1
    printf '%s\n' "$out"
    # kubernetes-validate only warns about kinds it has no schema for. Two are expected (not
    # API objects, or a CRD); any other is a typo in apiVersion or kind.
    unknown=$(printf '%s\n' "$out" | grep "Couldn't find schema" \
        | grep -v -e 'kind Kustomization with api version kustomize.config.k8s.io/v1beta1 ' \
                  -e 'kind ServiceMonitor with api version monitoring.coreos.com/v1 ' || true)
    if [ -n "$unknown" ]; then
        echo "ERROR kinds without a schema for Kubernetes $v (a typo in apiVersion or kind?):" >&2
        printf '%s\n' "$unknown" >&2
        status=1
    fi
done
"$venv/bin/python" check.py "$root" || status=1
[ "$status" = 0 ] && echo "deploy/kubernetes: ${#files[@]} files valid for Kubernetes $versions"
exit "$status"
