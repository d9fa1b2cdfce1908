# Two entry points on a fresh Debian 12 machine (as root, with a Rust toolchain):
#   make demo   installs what is missing, builds, runs containers through our shims
#   make test   installs what is missing, builds once, runs every test
# For the inner loop: `make test-unit` (no containerd, no VM), `make test AREA=<area>` (one
# area's unit and end-to-end tests: sdk runc wasm jail vm cri installer sandbox; scripts/test.sh),
# `make clean-machine` (what killed runs left: processes, mounts, CI roots; free disk).
TARGET  := x86_64-unknown-linux-gnu
# CARGO_TARGET_DIR, when set, is where cargo puts everything (and so where the binaries are).
TARGET_DIR := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)
BIN_DIR := $(TARGET_DIR)/$(TARGET)/release
# wasmtime 48 needs 1.95 (the workspace's rust-version).
RUST_MIN := 1.95
# Every Debian package that `make demo`, `make test` and `make bench` need; README.md says
# why each is here. Nothing else is assumed but the Rust toolchain.
APT_PKGS := \
	ca-certificates \
	gcc libc6-dev \
	libseccomp-dev \
	protobuf-compiler \
	containerd \
	runc \
	crun \
	busybox-static \
	containernetworking-plugins \
	iproute2 \
	criu \
	clang lld wasi-libc libclang-rt-14-dev-wasm32 \
	libcap-ng-dev \
	linux-source-6.1 make bc flex bison libelf-dev \
	erofs-utils e2fsprogs
# Installed without their Recommends: QEMU's pull in ~150 packages (firmware, GUI libraries)
# that a headless microvm never uses.
APT_PKGS_NO_RECOMMENDS := qemu-system-x86
# The micro-VM shim's guest image (shim-vm-image) and its virtiofsd.
VM_CACHE  := $(CURDIR)/target/vm-guest
VIRTIOFSD_VERSION := 1.14.0
VIRTIOFSD := $(CURDIR)/target/virtiofsd/bin/virtiofsd
# The VM shim's vsock channel (`Channel = "vsock"`): a vhost-user vsock device in user space.
VHOST_VSOCK_VERSION := 0.3.0
VHOST_VSOCK := $(CURDIR)/target/vhost-device-vsock/bin/vhost-device-vsock
# cargo-nextest runs the tests: each in its own process, with a time bound
# (.config/nextest.toml). The machine's own when it is this version, else built from crates.io.
NEXTEST_VERSION := 0.9.143
NEXTEST := $(CURDIR)/target/cargo-nextest-$(NEXTEST_VERSION)/bin/cargo-nextest
export SHIM_BIN_DIR := $(BIN_DIR)
export SHIM_VM_CACHE := $(VM_CACHE)
# The tests and the build steps print names of things that failed; colour codes only hide them in logs.
export CARGO_TERM_COLOR ?= never

# The release: target/dist/<name>/ (binaries, deploy/, containerd/ snippets, SHA256SUMS;
# freebsd/ with the jail shim and the installer once `make check-freebsd` linked them), its
# tarball, and the
# installer's OCI image (what deploy/shim-installer.yaml runs).
VERSION   := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DIST_DIR  := $(TARGET_DIR)/dist
DIST_NAME := containerd-shims-$(VERSION)-linux-amd64

.PHONY: demo test test-unit clean-machine nextest bench deps build guest guest-image virtiofsd vhost-device-vsock fmt lint install check-freebsd dist check-size

deps:
	@scripts/deps.sh $(RUST_MIN) $(APT_PKGS) --no-recommends $(APT_PKGS_NO_RECOMMENDS)

# Binaries, test harnesses and examples (the skeleton shim, in $(BIN_DIR)/examples) in one
# invocation: built separately, cargo resolves dev-dependency features differently and
# rebuilds most crates for the tests.
build: deps virtiofsd vhost-device-vsock
	@scripts/step.sh build cargo build --release --workspace --bins --tests --examples
	@$(MAKE) --no-print-directory guest-image

# The micro-VM shim's guest image alone: builds only what it needs (the agent, the builder).
guest: deps
	@scripts/step.sh guest cargo build --release -p shim-vm --bin shim-vm-agent --bin shim-vm-image
	@$(MAKE) --no-print-directory guest-image

# Kernel (built once from Debian's linux-source with shim-vm/guest/kernel.config, ~5 min, cached
# in $(VM_CACHE)/kernels) and initramfs, in $(VM_CACHE)/<hash of the inputs>, installed as
# $(BIN_DIR)/vm-guest (where the shim looks); does nothing when no input changed.
guest-image:
	$(BIN_DIR)/shim-vm-image --init $(BIN_DIR)/shim-vm-agent --cache $(VM_CACHE) --install $(BIN_DIR)

# virtiofsd is not packaged in bookworm: built from crates.io once, outside the workspace (its
# .cargo/config.toml would make it static), and put next to the shim, where it looks for it.
virtiofsd: deps $(VIRTIOFSD)
	@mkdir -p $(BIN_DIR)
	@ln -sfn $(VIRTIOFSD) $(BIN_DIR)/virtiofsd
$(VIRTIOFSD): | deps
	@scripts/step.sh virtiofsd sh -c 'cd / && cargo install --locked --root $(CURDIR)/target/virtiofsd virtiofsd@$(VIRTIOFSD_VERSION)'

# vhost-device-vsock (crates.io, rust-vmm): the host side of the guest's AF_VSOCK when the
# host has no /dev/vhost-vsock or no working KVM (this one); built like virtiofsd.
vhost-device-vsock: deps $(VHOST_VSOCK)
	@mkdir -p $(BIN_DIR)
	@ln -sfn $(VHOST_VSOCK) $(BIN_DIR)/vhost-device-vsock
$(VHOST_VSOCK): | deps
	@scripts/step.sh vhost-device-vsock sh -c 'cd / && cargo install --locked --root $(CURDIR)/target/vhost-device-vsock vhost-device-vsock@$(VHOST_VSOCK_VERSION)'

demo: build
	$(BIN_DIR)/shim-demo

# One release build serves the unit tests, the end-to-end tests and the binaries they drive.
# AREA=<area> runs one area's tests only (scripts/test.sh lists them).
test: build $(NEXTEST)
	@scripts/test.sh $(NEXTEST) $(AREA)

# Every crate's unit tests and doc tests: no containerd, no VM, so no guest image either.
test-unit: deps $(NEXTEST)
	@scripts/test.sh $(NEXTEST) unit

nextest: deps $(NEXTEST)
$(NEXTEST): | deps
	@scripts/step.sh nextest scripts/install-nextest.sh $(NEXTEST_VERSION) $(CURDIR)/target/cargo-nextest-$(NEXTEST_VERSION)

# What killed test and CI runs left on this machine (test processes, QEMU, mounts, network
# namespaces, pristine roots), removed by pid and path; free disk before and after.
clean-machine:
	@scripts/clean-machine.sh $(BIN_DIR)

bench: build
	$(BIN_DIR)/shim-bench --runs 30
	$(BIN_DIR)/wasm-bench --runs 20
	$(BIN_DIR)/vm-bench --runs 10

dist: build
	@mkdir -p $(DIST_DIR)
	$(BIN_DIR)/shim-dist --bin-dir $(BIN_DIR) --repo $(CURDIR) --out $(DIST_DIR)/$(DIST_NAME) --image $(DIST_DIR)/shim-installer.oci.tar \
		$(if $(wildcard $(FREEBSD_EXES)),--freebsd $(FREEBSD_BIN))
	tar -C $(DIST_DIR) -czf $(DIST_DIR)/$(DIST_NAME).tar.gz $(DIST_NAME)
	@cd $(DIST_DIR) && sha256sum $(DIST_NAME).tar.gz shim-installer.oci.tar > SHA256SUMS && cat SHA256SUMS

fmt:
	cargo fmt --all -- --check

# clippy on every target, and the SDK's documentation (what runtime authors read first)
# without a broken link or an undocumented public item.
lint: deps
	@scripts/step.sh lint cargo clippy --release --workspace --all-targets -- -D warnings
	@RUSTDOCFLAGS="-D warnings" scripts/step.sh doc cargo doc --release --no-deps -p shim-common

# Sizes: no non-test source file over 600 lines, each backend within its budget of code lines,
# no code two backends share (integration/src/bin/check_size.rs); what is over today stands in
# .config/size-ceilings at its size today, and may only shrink.
check-size: deps
	@scripts/step.sh check-size cargo run --release --quiet -p integration --bin check-size

# Install the shims where containerd looks for them (its PATH).
# The VM shim finds its guest image (vm-guest/) and virtiofsd beside itself.
install: build
	install -m 0755 $(BIN_DIR)/containerd-shim-runc-v2 $(BIN_DIR)/containerd-shim-wasm-v2 $(BIN_DIR)/containerd-shim-jail-v2 $(BIN_DIR)/containerd-shim-vm-v2 /usr/local/bin/
	install -m 0755 $(VIRTIOFSD) /usr/local/bin/virtiofsd
	install -m 0755 $(VHOST_VSOCK) /usr/local/bin/vhost-device-vsock
	install -d /usr/local/bin/vm-guest
	install -m 0644 $(BIN_DIR)/vm-guest/vmlinux $(BIN_DIR)/vm-guest/initramfs.cpio /usr/local/bin/vm-guest/

# Type-checks the portable SDK, the jail shim and the installer for FreeBSD, and links both.
# rustup cannot fetch FreeBSD's std on these machines, so Debian's rustc-web builds it from
# its own sources (rust-web-src) through cargo's build-std, which is unstable (hence
# RUSTC_BOOTSTRAP). zig (PyPI's ziglang, unpacked into target/) links: it carries FreeBSD
# 14's libc stubs, so no FreeBSD sysroot is needed (scripts/zig-freebsd-cc). `file` must
# call the result a FreeBSD ELF. pip reads no SSL_CERT_FILE: where that names the trust store
# (a machine behind a TLS proxy, CI's pristine root), it is passed on as --cert.
# protoc: the installer's CRI client (k8s-cri) is generated at build time.
FREEBSD_PKGS := rustc-web cargo-web rust-web-src python3-pip file protobuf-compiler
FREEBSD_LOG  := $(CURDIR)/target/freebsd-check.log
FREEBSD_ENV  := RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=$(CURDIR)/target/freebsd
FREEBSD_BIN  := $(CURDIR)/target/freebsd/x86_64-unknown-freebsd/release
FREEBSD_EXES := $(FREEBSD_BIN)/containerd-shim-jail-v2 $(FREEBSD_BIN)/shim-installer
ZIG_VERSION  := 0.15.1
ZIG          := $(CURDIR)/target/ziglang-$(ZIG_VERSION)/ziglang/zig
check-freebsd:
	@scripts/deps.sh $(RUST_MIN) $(FREEBSD_PKGS)
	@mkdir -p target
	$(FREEBSD_ENV) /usr/bin/cargo check -Zbuild-std=std,panic_abort --target x86_64-unknown-freebsd \
		-p shim-common -p shim-jail -p shim-installer >$(FREEBSD_LOG) 2>&1 || { cat $(FREEBSD_LOG); exit 1; }
	@if grep -qE '^(warning|error)' $(FREEBSD_LOG); then cat $(FREEBSD_LOG); echo "FreeBSD check: warnings"; exit 1; fi
	@tail -1 $(FREEBSD_LOG)
	@test -x $(ZIG) || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
		$(if $(SSL_CERT_FILE),--cert $(SSL_CERT_FILE)) --target $(CURDIR)/target/ziglang-$(ZIG_VERSION) ziglang==$(ZIG_VERSION)
	$(FREEBSD_ENV) ZIG=$(ZIG) CARGO_TARGET_X86_64_UNKNOWN_FREEBSD_LINKER=$(CURDIR)/scripts/zig-freebsd-cc \
		/usr/bin/cargo build --release -Zbuild-std=std,panic_abort --target x86_64-unknown-freebsd \
		-p shim-jail -p shim-installer >>$(FREEBSD_LOG) 2>&1 || { cat $(FREEBSD_LOG); exit 1; }
	@for f in $(FREEBSD_EXES); do \
		file $$f | tee -a $(FREEBSD_LOG); \
		file $$f | grep -q 'FreeBSD-style' || { echo "$$f: not a FreeBSD binary"; exit 1; }; \
	done
