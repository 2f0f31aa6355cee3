# Veil: build, test and demo targets. `make demo` and `make test` install missing Debian
# packages themselves (make deps). Tests need root (network namespaces, TUN).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := build

DOTNET ?= dotnet
RID ?= linux-x64
OUT ?= out
UNIT_FILTER := Category!=Slow&Category!=NetNs
RESULTS := TestResults

# command -> Debian package that provides it
DEPS := ip:iproute2 iperf3:iperf3 ping:iputils-ping tcpdump:tcpdump python3:python3 jq:jq pgrep:procps busybox:busybox curl:curl promtool:prometheus
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: build deps test test-unit test-netns test-openwrt test-slow demo bench toc clean

build:
	$(DOTNET) publish Veil.csproj -c Release -r $(RID) -o $(OUT)

# Installs only what is missing: apt-get update once, then one apt-get install.
deps:
	@missing=''; \
	for d in $(DEPS); do command -v "$${d%%:*}" >/dev/null 2>&1 || missing+=" $${d#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-upgrade $$missing </dev/null; \
	fi

# Unit tests (no Slow, no NetNs) + namespace scenarios; the last line sums both.
test: deps build
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

test-netns: deps build
	tests/netns/run-all.sh

test-openwrt: build
	tests/openwrt/run.sh

demo: deps build
	tests/netns/demo.sh

# tests/bench's harness: interleaved rounds (BENCH_IMPLS, BENCH_RUNS, BENCH_SECONDS), a lossy-link
# row (BENCH_LOSSY="DELAY_MS LOSS_PCT" or off), ratios and footprint.
bench: deps build
	tests/bench/bench.sh

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
