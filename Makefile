# Veil: build, test and demo targets. `make demo` and `make test` install missing Debian
# packages themselves (make deps). Tests need root (network namespaces, TUN).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := build

DOTNET ?= dotnet
# This host's runtime identifier: `make build` builds it into $(OUT)/veil. Any other RID goes to
# $(OUT)/RID/veil, with its own bin/RID and obj/RID (the host build, the tests and an IDE keep
# bin/ and obj/ to themselves); RIDs with a recipe below also get their cross flags and toolchain.
UNAME_M := $(shell uname -m)
HOST_RID := $(if $(wildcard /lib/ld-musl-$(UNAME_M).so.1),linux-musl,linux)-$(patsubst x86_64,x64,$(patsubst aarch64,arm64,$(UNAME_M)))
RID ?= $(HOST_RID)
OUT ?= out
UNIT_FILTER := Category!=Slow&Category!=NetNs
RESULTS := TestResults

# command -> Debian package that provides it
DEPS := ip:iproute2 iperf3:iperf3 cc:gcc ping:iputils-ping tcpdump:tcpdump python3:python3 jq:jq pgrep:procps busybox:busybox curl:curl promtool:prometheus systemd-analyze:systemd unshare:util-linux nsenter:util-linux setpriv:util-linux nft:nftables miniupnpd:miniupnpd-nftables chromium:chromium
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

# Cross recipes, per host: the RIDs `make cross` builds besides the host's own; per RID the
# publish flags and the Debian packages to build it and to run it here (TEST:PACKAGE, TEST a
# command or an absolute path). linux-arm64 links with clang/lld against the aarch64 cross libc
# (SysRoot=/ : the cross libc.so linker script names absolute paths) and runs under qemu-user
# with the arm64 multiarch libc and OpenSSL (tests/arm64/veil).
CROSS_RIDS_linux-x64 := linux-arm64
CROSS_FLAGS_linux-x64_linux-arm64 := -p:SysRoot=/ -p:LinkerFlavor=lld -p:ObjCopyName=aarch64-linux-gnu-objcopy
CROSS_DEPS_linux-x64_linux-arm64 := clang:clang ld.lld:lld llvm-ar:llvm aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu \
	aarch64-linux-gnu-objcopy:binutils-aarch64-linux-gnu /usr/aarch64-linux-gnu/lib/libc.so:libc6-dev-arm64-cross \
	qemu-aarch64:qemu-user /lib/ld-linux-aarch64.so.1:libc6:arm64 /usr/lib/aarch64-linux-gnu/libssl.so.3:libssl3:arm64

ifeq ($(RID),$(HOST_RID))
BUILD_OUT := $(OUT)
BUILD_FLAGS :=
else
BUILD_OUT := $(OUT)/$(RID)
BUILD_FLAGS := -p:BaseIntermediateOutputPath=obj/$(RID)/ -p:BaseOutputPath=bin/$(RID)/ $(CROSS_FLAGS_$(HOST_RID)_$(RID))
endif

# install_missing TEST:PACKAGE... -- apt-get update once, then one apt-get install of the packages
# whose TEST (a command, or an absolute path that must exist) fails; a PACKAGE:ARCH adds ARCH to
# dpkg's foreign architectures first
define install_missing
@missing='' archs=''; \
	for d in $(1); do t=$${d%%:*} p=$${d#*:}; \
		if [[ $$t == /* ]]; then [ -e "$$t" ] && continue; else command -v "$$t" >/dev/null 2>&1 && continue; fi; \
		missing+=" $$p"; [[ $$p == *:* ]] && archs+=" $${p#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		for a in $$archs; do dpkg --print-foreign-architectures | grep -qx "$$a" || $(SUDO) dpkg --add-architecture "$$a" || exit 1; done; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade $$missing </dev/null; \
	fi
endef

.PHONY: build cross cross-deps deps test test-unit test-netns test-openwrt test-slow test-arm64 fuzz demo bench toc clean scale

# make build [RID=...] -- $(OUT)/veil for this host, $(OUT)/RID/veil for another RID
build: $(if $(CROSS_DEPS_$(HOST_RID)_$(RID)),cross-deps)
	$(DOTNET) publish Veil.csproj -c Release -r $(RID) -o $(BUILD_OUT) $(BUILD_FLAGS)

# Every RID this host can build: its own, then those with a cross recipe.
cross:
	@for r in $(HOST_RID) $(CROSS_RIDS_$(HOST_RID)); do $(MAKE) --no-print-directory build RID=$$r || exit 1; done

# The toolchain for RID=... (and what runs its binary here), when missing.
cross-deps:
	$(call install_missing,$(CROSS_DEPS_$(HOST_RID)_$(RID)))

# Installs only what is missing: apt-get update once, then one apt-get install.
deps:
	$(call install_missing,$(DEPS))

# Unit tests (no Slow, no NetNs) + namespace scenarios; the last line sums both.
test: deps cross
	@rm -rf $(RESULTS); \
	unit_rc=0; netns_rc=0; openwrt_rc=0; \
	$(DOTNET) test tests/Veil.Tests --filter "$(UNIT_FILTER)" \
		--logger "trx;LogFileName=unit.trx" --results-directory $(RESULTS) || unit_rc=$$?; \
	trx=$(RESULTS)/unit.trx; \
	if [ -f "$$trx" ]; then \
		up=$$(grep -o '<Counters [^>]*' "$$trx" | grep -o ' passed="[0-9]*"' | grep -o '[0-9]*'); \
		uf=$$(grep -o '<Counters [^>]*' "$$trx" | grep -o ' failed="[0-9]*"' | grep -o '[0-9]*'); \
	else up=0; uf=1; echo "unit tests did not run (build failed?)"; fi; \
	up=$${up:-0}; uf=$${uf:-0}; \
	if [ "$$unit_rc" -ne 0 ] && [ "$$uf" -eq 0 ]; then uf=1; fi; \
	tests/netns/run-all.sh 2>&1 | tee $(RESULTS)/netns.out || netns_rc=$$?; \
	np=$$(sed -n 's/^netns: \([0-9]*\) passed, \([0-9]*\) failed$$/\1/p' $(RESULTS)/netns.out); \
	nf=$$(sed -n 's/^netns: \([0-9]*\) passed, \([0-9]*\) failed$$/\2/p' $(RESULTS)/netns.out); \
	np=$${np:-0}; nf=$${nf:-0}; \
	if [ "$$netns_rc" -ne 0 ] && [ "$$nf" -eq 0 ]; then nf=1; fi; \
	tests/openwrt/run.sh 2>&1 | tee $(RESULTS)/openwrt.out || openwrt_rc=$$?; \
	op=$$(sed -n 's/^openwrt: \([0-9]*\) passed, \([0-9]*\) failed$$/\1/p' $(RESULTS)/openwrt.out); \
	of=$$(sed -n 's/^openwrt: \([0-9]*\) passed, \([0-9]*\) failed$$/\2/p' $(RESULTS)/openwrt.out); \
	op=$${op:-0}; of=$${of:-0}; \
	if [ "$$openwrt_rc" -ne 0 ] && [ "$$of" -eq 0 ]; then of=1; fi; \
	echo "unit: $$up passed, $$uf failed"; \
	echo "$$((up + np + op)) passed, $$((uf + nf + of)) failed"; \
	[ $$((uf + nf + of)) -eq 0 ]

test-unit:
	$(DOTNET) test tests/Veil.Tests --filter "$(UNIT_FILTER)"

test-slow:
	$(DOTNET) test tests/Veil.Tests -c Release --filter "Category=Slow"

# The fuzz tests alone (tests/Veil.Tests/FuzzTests.cs, in make test-unit at scale 1, ~15 s) at
# FUZZ_SCALE times their iterations, printing per-parser figures. VEIL_FUZZ_SEED (another mutation
# sequence) and VEIL_FUZZ_SECONDS (a cap per parser) pass through.
FUZZ_SCALE ?= 50
fuzz:
	VEIL_FUZZ_SCALE=$(FUZZ_SCALE) $(DOTNET) test tests/Veil.Tests -c Release --filter "Category=Fuzz" \
		--logger "console;verbosity=detailed"

test-netns: deps build
	tests/netns/run-all.sh

test-openwrt: build
	tests/openwrt/run.sh

# The linux-arm64 build under qemu-user against this host's build (tests/netns/arm64.sh).
test-arm64: deps
	@$(MAKE) --no-print-directory build RID=$(HOST_RID)
	@$(MAKE) --no-print-directory build RID=linux-arm64
	tests/netns/run-all.sh arm64

demo: deps build
	tests/netns/demo.sh

# tests/bench's harness: interleaved rounds (BENCH_IMPLS, BENCH_RUNS, BENCH_SECONDS), a lossy-link
# row (BENCH_LOSSY="DELAY_MS LOSS_PCT" or off), ratios and footprint.
bench: deps build
	tests/bench/bench.sh
	tests/bench/flood.sh
	tests/bench/nat.sh

# A real mesh of SCALE_NODES (default 100) veil processes in network namespaces on one bridge:
# time to a full mesh, steady control bytes/s, CPU and RSS per node (tests/bench/scale.sh); then
# one hub with HUB_PEERS (default 1,000) real veil spokes: CPU and RSS per peer (tests/bench/hub.sh).
scale: deps build
	tests/bench/scale.sh
	tests/bench/hub.sh

# The section markers (`// ==== N. Title ====...`) must equal the TOC in the header
# (`//   N. Title` lines between `// TOC` and `// END TOC`).
toc:
	@header=$$(sed -n '/^\/\/ TOC *$$/,/^\/\/ END TOC *$$/p' Veil.cs \
		| sed -n 's|^//  *\([0-9][0-9]*\. .*[^ ]\) *$$|\1|p'); \
	markers=$$(grep '^// ==== ' Veil.cs | sed -e 's|^// ==== ||' -e 's| *=*$$||'); \
	if [ -z "$$header" ]; then echo "toc: no '// TOC' ... '// END TOC' block in Veil.cs"; exit 1; fi; \
	if diff -u --label 'TOC in header' --label 'section markers' \
		<(printf '%s\n' "$$header") <(printf '%s\n' "$$markers"); then \
		echo "toc: $$(printf '%s\n' "$$markers" | wc -l) sections match"; \
	else echo "toc: the header TOC and the // ==== markers differ (see diff above)"; exit 1; fi

clean:
	rm -rf $(OUT) bin obj tests/Veil.Tests/bin tests/Veil.Tests/obj $(RESULTS) .run
