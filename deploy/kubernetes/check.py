"""What a schema cannot see: the manifests against the daemon and its systemd unit.

Run by validate.sh (with the PyYAML that kubernetes-validate installs):
    python3 check.py REPO_ROOT
Checks that the uprobed container has exactly the capabilities of systemd/uprobed.service and
the rest of its security context; that uprobed.conf in the ConfigMap uses only keys the daemon
knows (those of config/uprobed.conf) and a metrics address the daemon accepts; that the
metrics port and paths agree across the config, the proxy, the annotations and the Service;
and that the kustomization lists every manifest.
"""
import os
import re
import sys

import yaml

root = sys.argv[1]
here = os.path.join(root, "deploy", "kubernetes")
errors = []


def check(ok, message):
    if not ok:
        errors.append(message)


def load(name):
    with open(os.path.join(here, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def conf_keys(text):
    """`key = value` lines of an uprobed.conf (`#` starts a comment), as a dict."""
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


# The unit's capabilities.
with open(os.path.join(root, "systemd", "uprobed.service")) as f:
    unit = f.read()
bounding = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split()
unit_caps = sorted(c.removeprefix("CAP_") for c in bounding)

[ds] = load("daemonset.yaml")
pod = ds["spec"]["template"]["spec"]
containers = {c["name"]: c for c in pod["containers"]}
daemon, proxy = containers["uprobed"], containers["metrics-proxy"]
sc = daemon["securityContext"]

check(sorted(sc["capabilities"]["add"]) == unit_caps,
      f"uprobed's capabilities.add {sorted(sc['capabilities']['add'])} != the unit's {unit_caps}")
check(pod.get("hostPID") is True, "hostPID must be true")
check(not pod.get("hostNetwork"), "hostNetwork must be false (metrics go through the proxy)")
check(pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", "the pod's seccomp profile must be RuntimeDefault")
for c in pod["containers"]:
    csc = c["securityContext"]
    check(csc.get("privileged") is False, f"{c['name']}: privileged must be false")
    check(csc.get("readOnlyRootFilesystem") is True, f"{c['name']}: readOnlyRootFilesystem must be true")
    check(csc["capabilities"].get("drop") == ["ALL"], f"{c['name']}: capabilities must drop ALL")
    check(csc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault",
          f"{c['name']}: seccomp must stay RuntimeDefault")
check("add" not in proxy["securityContext"]["capabilities"], "metrics-proxy gets no capabilities")
for m in daemon["volumeMounts"]:
    check(m.get("recursiveReadOnly", "Disabled") in ("Disabled", "IfPossible", "Enabled"),
          f"mount {m['name']}: recursiveReadOnly {m.get('recursiveReadOnly')!r}")
mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
volumes = {v["name"]: v for v in pod["volumes"]}
check(volumes["host-root"]["hostPath"]["path"] == "/" and
      next(m for m in daemon["volumeMounts"] if m["name"] == "host-root").get("readOnly") is True,
      "the host's root must be mounted read-only")

# uprobed.conf: keys the daemon knows, paths the pod mounts, a metrics address it accepts.
[cm] = load("configmap-config.yaml")
known = conf_keys(open(os.path.join(root, "config", "uprobed.conf")).read())
conf = conf_keys(cm["data"]["uprobed.conf"])
for key in conf:
    check(key in known, f"uprobed.conf: unknown key {key!r} (the daemon refuses to start)")
config_path = daemon["command"][daemon["command"].index("--config") + 1]
check(os.path.dirname(config_path) == mounts["config"] and os.path.basename(config_path) in cm["data"],
      f"--config {config_path} is not the ConfigMap's file at {mounts['config']}")
check(os.path.dirname(conf.get("socket", known["socket"])) == mounts["run"], "the socket is not on the /run/uprobed host path")
check(conf.get("state_dir", known["state_dir"]) == mounts["state"], "state_dir is not the state host path")
check(mounts["probes"] == "/etc/uprobed/probes.d", "probe sets belong at /etc/uprobed/probes.d")
listen = conf.get("metrics_listen", "")
m = re.fullmatch(r"(127\.[0-9.]+|localhost):([0-9]+)", listen)
check(m is not None, f"metrics_listen {listen!r}: the proxy needs a loopback TCP address")

# The metrics port, end to end.
if m:
    listen_arg, target_arg = proxy["command"][1], proxy["command"][2]
    check(target_arg == f"TCP:{m.group(1)}:{m.group(2)}", f"the proxy forwards to {target_arg}, uprobed listens on {listen}")
    port = int(re.match(r"TCP-LISTEN:([0-9]+)", listen_arg).group(1))
    check(port != int(m.group(2)), "the proxy and uprobed cannot share a port in one network namespace")
    check([p["containerPort"] for p in proxy["ports"] if p["name"] == "metrics"] == [port], "containerPort 'metrics' != the proxy's port")
    check(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port), "prometheus.io/port != the proxy's port")
    [svc] = load("service.yaml")
    check([p["port"] for p in svc["spec"]["ports"] if p["targetPort"] == "metrics"] == [port], "the Service's metrics port != the proxy's port")

# Probe sets: the ConfigMap is mounted where probes_dir looks, and each set in it (and the one
# its comment shows) has the shape uprobed reads (docs/PROBE-SETS.md; the daemon's own parser
# decides the rest, e.g. spellings: `uprobectl diff` checks a set against a node).
check(conf.get("probes_dir", known["probes_dir"]) == mounts["probes"], "probes_dir is not where the probe-set ConfigMap is mounted")
check(volumes["probes"]["configMap"]["name"] == "uprobed-probes", "the probes volume is not the uprobed-probes ConfigMap")


def check_set(key, text):
    check(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}\.ya?ml", key) is not None,
          f"probe set {key!r}: the key must be NAME.yaml or NAME.yml (NAME: letters, digits, . _ -)")
    doc = yaml.safe_load(text)
    if not (isinstance(doc, dict) and set(doc) == {"probes"} and isinstance(doc["probes"], (list, type(None)))):
        check(False, f"probe set {key!r}: must be a mapping with only a 'probes:' list")
        return
    for entry in doc["probes"] or []:
        if isinstance(entry, dict):
            check(set(entry) <= {"probe", "follow", "force"} and "probe" in entry,
                  f"probe set {key!r}: entry {entry!r} has keys other than probe, follow, force (no pid: a set names binaries)")
        else:
            check(isinstance(entry, str) and ":" in entry, f"probe set {key!r}: entry {entry!r} is not a probe spelling")


with open(os.path.join(here, "configmap-probes.yaml")) as f:
    header = [line[1:] for line in f.read().splitlines() if line.startswith("#")]
start = next(i for i, line in enumerate(header) if line.strip() == "data:")
example = yaml.safe_load("\n".join(line[2:] for line in header[start:] if line.startswith("  ") or not line.strip()).split("\n\n")[0])
check(isinstance(example, dict) and example.get("data"), "configmap-probes.yaml's comment shows no example set")
for key, text in (example or {}).get("data", {}).items():
    check_set(key, text)
[probes_cm] = load("configmap-probes.yaml")
for key, text in (probes_cm.get("data") or {}).items():
    check_set(key, text)

# The kustomization lists every manifest of the directory.
[kust] = load("kustomization.yaml")
manifests = sorted(f for f in os.listdir(here) if f.endswith(".yaml") and f != "kustomization.yaml")
check(sorted(kust["resources"]) == manifests, f"kustomization.yaml resources {sorted(kust['resources'])} != {manifests}")

for e in errors:
    print(f"ERROR {e}")
if errors:
    sys.exit(1)
print(f"OK uprobed's capabilities are the unit's ({' '.join(unit_caps)}); config keys, mounts, probe sets and the metrics port agree")
