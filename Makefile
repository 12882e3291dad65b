# uprobed — build, run, test. Every target installs what it needs on a fresh Debian 12 machine
# (as root, through apt-get) before it builds: `build`, `run` and `install` only the build
# dependencies; `test`, `sanitize`, the benchmarks and `soak` the test peers too.
SWIFT   ?= swift
PREFIX  ?= /usr/local
# What `swift build` needs besides the Swift toolchain: libsystemd's headers, library and .pc
# file (the CSystemd target, found through pkg-config); zlib's (the CZlib target: compressed
# symbol names); libc and Linux UAPI headers for the C shim (libc6-dev, which pulls
# linux-libc-dev); the linker, crt files and libgcc (binutils, gcc); libsqlite3.so.0, which
# SwiftPM itself loads.
BUILD_DEBS := libsystemd-dev zlib1g-dev pkg-config libc6-dev gcc binutils libsqlite3-0
# What the tests, sanitizer runs, benchmarks and soak call or probe: systemd-analyze and
# systemd-socket-activate (systemd), <sys/sdt.h> for the USDT fixtures (systemtap-sdt-dev),
# python3 and sqlite3 as probed targets and the soak driver, promtool (prometheus), useradd
# (passwd), setpriv/unshare/prlimit (util-linux), ss (iproute2), setcap (libcap2-bin), tmux (the
# uprobectl top tests drive a terminal); and the
# tools the benchmarks are compared with or traced by (bpftrace, bpftool, linux-perf).
# python3-venv: the OTLP tests' receiver runs in a venv with opentelemetry-proto from PyPI
# (Tests/OTLPReceiver/venv.sh, pinned, into .build-otlp/venv).
TEST_DEBS  := systemd systemtap-sdt-dev python3 python3-venv sqlite3 bpftrace bpftool linux-perf prometheus passwd util-linux iproute2 libcap2-bin tmux
DEBS       := $(BUILD_DEBS) $(TEST_DEBS)
# What `make k8s-validate` needs: python3 with venv (deploy/kubernetes/validate.sh pip-installs
# a pinned kubernetes-validate into .build-k8s/venv).
K8S_DEBS   := python3 python3-venv
SOCKET  ?= /run/uprobed/uprobed.sock
ARGS    ?=

.PHONY: deps deps-build build run test test-unit sanitize fuzz fuzz-ci bench bench-tree bench-batch bench-read bench-whole bench-restart bench-latency soak k8s-validate completions man install clean

# $(call apt_install,PACKAGES): install those of PACKAGES that are missing (as root, apt-get).
define apt_install
@missing=""; for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

## Install the Debian packages the build needs (only the missing ones).
deps-build:
	$(call apt_install,$(BUILD_DEBS))

## Install the Debian packages the build and the tests need (only the missing ones).
deps:
	$(call apt_install,$(DEBS))

build: deps-build
	$(SWIFT) build

## Run the daemon in the foreground with built-in defaults (socket $(SOCKET)).
run: build
	.build/debug/uprobed --socket $(SOCKET) $(ARGS)

## The test suite: unit tests plus integration tests against the real kernel.
test: deps
	Tests/OTLPReceiver/venv.sh
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## The tree and epoch tests under ThreadSanitizer and AddressSanitizer. The ASan run skips the
## XCTest runner, which itself leaks a few hundred bytes at exit (LeakSanitizer would fail it);
## the Swift Testing run is leak-checked. Without the package trait OTLP (--disable-default-traits):
## these tests do not touch the OTLP exporter, and swift-otel with swift-protobuf and
## async-http-client would add several minutes to each of the two builds.
sanitize: deps
	$(SWIFT) test --sanitize=thread --disable-default-traits --scratch-path .build-tsan --filter "UprobeTreeTests|BatchDecisionTests|UprobedProtocolTests|BlockingPoolTests|ReadPathTests|CompressedNamesTests|preparedRuns|preparedReply|snapshotOffTheWriter"
	$(SWIFT) test --sanitize=address --disable-default-traits --disable-xctest --scratch-path .build-asan --filter "UprobeTreeTests|BatchDecisionTests|UprobedProtocolTests|BlockingPoolTests|ReadPathTests|CompressedNamesTests|preparedRuns|preparedReply|snapshotOffTheWriter"

## libFuzzer on the JSON parser (with a differential check against Foundation) and the ELF
## reader, FUZZ_SECONDS each (default 30; CI runs the default). fuzz/README.md: the long run.
FUZZ_SECONDS ?= 30
fuzz: deps
	bash fuzz/run.sh $(FUZZ_SECONDS)

## What CI runs: a fixed number of inputs from a fixed seed (the same run everywhere; see run.sh).
fuzz-ci: deps
	rm -rf .build-fuzz/corpus
	FUZZ_RUNS=300000,6000 bash fuzz/run.sh

## The Kubernetes manifests (deploy/kubernetes/) against the API schemas of Kubernetes 1.30 and
## 1.37 (kubernetes-validate --strict, pinned, from PyPI), the systemd unit's capabilities and
## the daemon's config keys. No Swift build; a few seconds once the venv exists.
k8s-validate:
	$(call apt_install,$(K8S_DEBS))
	deploy/kubernetes/validate.sh

bench: bench-tree bench-batch bench-read bench-whole bench-restart bench-latency

bench-tree: deps
	$(SWIFT) run -c release bench-tree --repeats 5 --pace-spin

## The daemon's read path (Engine.read, stats tables) on real links, idle and under a writer churn.
bench-read: deps
	$(SWIFT) run -c release bench-read

bench-batch: deps
	$(SWIFT) build -c release
	$(SWIFT) run -c release bench-batch

## A whole binary (issue 26): every function of swift-frontend through the socket, vs the kernel floor.
bench-whole: deps
	$(SWIFT) build -c release
	$(SWIFT) run -c release bench-whole

## Restarts: exec to READY=1 adopting N pinned probes vs attaching them again (RESTART_SIZES:
## probe counts, `latencyN` for N latency probes, or `frontend` for every function of
## swift-frontend, ~241,000: tens of minutes).
RESTART_SIZES ?= 10000 latency10000
bench-restart: deps
	$(SWIFT) build -c release --product uprobed
	/usr/bin/python3 bench/restart.py $(RESTART_SIZES)
bench-latency: deps
	$(SWIFT) build -c release
	$(SWIFT) run -c release bench-latency

## Soak: one release uprobed under mixed load for SOAK_SECONDS (default 60), then checks that
## nothing hangs, leaks or floods the log (bench/soak.py says what it does and checks).
SOAK_SECONDS ?= 60
soak: deps
	$(SWIFT) build -c release --product uprobed
	gcc -O1 -o .build/soak-many Tests/Fixtures/kernel/many.c
	python3 bench/soak.py .build/release/uprobed .build/soak-many $(SOAK_SECONDS)

## Shell completions (bash, zsh, fish) and man pages, generated from the ArgumentParser
## definitions of the release binaries into $(GEN). The man pages come from
## swift-argument-parser's GenerateManual plugin (in the package checkout; no network).
GEN     := .build/generated
MANOUT  := .build/plugins/GenerateManual/outputs
completions: deps-build
	$(SWIFT) build -c release --product uprobectl
	mkdir -p $(GEN)
	for sh in bash zsh fish; do .build/release/uprobectl --generate-completion-script $$sh > $(GEN)/uprobectl.$$sh || exit 1; done

man: deps-build
	$(SWIFT) package plugin generate-manual --configuration release
	mkdir -p $(GEN)
	cp $(MANOUT)/uprobectl/uprobectl.1 $(MANOUT)/uprobed/uprobed.1 $(GEN)/

install: build
	$(SWIFT) build -c release
	$(MAKE) completions man
	install -D -m 0755 .build/release/uprobed $(DESTDIR)$(PREFIX)/bin/uprobed
	install -D -m 0755 .build/release/uprobectl $(DESTDIR)$(PREFIX)/bin/uprobectl
	install -D -m 0644 $(GEN)/uprobectl.bash $(DESTDIR)/usr/share/bash-completion/completions/uprobectl
	install -D -m 0644 $(GEN)/uprobectl.zsh $(DESTDIR)/usr/share/zsh/vendor-completions/_uprobectl
	install -D -m 0644 $(GEN)/uprobectl.fish $(DESTDIR)/usr/share/fish/vendor_completions.d/uprobectl.fish
	install -D -m 0644 $(GEN)/uprobectl.1 $(DESTDIR)$(PREFIX)/share/man/man1/uprobectl.1
	install -D -m 0644 $(GEN)/uprobed.1 $(DESTDIR)$(PREFIX)/share/man/man1/uprobed.1
	install -D -m 0644 systemd/uprobed.service $(DESTDIR)/etc/systemd/system/uprobed.service
	install -D -m 0644 systemd/uprobed.socket $(DESTDIR)/etc/systemd/system/uprobed.socket
	install -D -m 0644 config/uprobed.conf $(DESTDIR)/etc/uprobed/uprobed.conf
	# probes_dir, empty: the example set is documentation to copy, not something to enable.
	install -d -m 0755 $(DESTDIR)/etc/uprobed/probes.d
	install -D -m 0644 config/probes.d/libc-alloc.yaml $(DESTDIR)$(PREFIX)/share/doc/uprobed/examples/probes.d/libc-alloc.yaml

clean:
	rm -rf .build .build-tsan .build-asan .build-k8s .build-otlp
