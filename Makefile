# Every target that needs Python depends on $(STAMP), so `make demo` and
# `make test` each work alone on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SOURCES := pyproject.toml setup.py protos_build.py $(wildcard protos/*/v1/*.proto) $(wildcard hotpath/*.pyx hotpath/*.pxd)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test lint bench bench-overload soak chaos sim protos clean install debug-test h2load redis \
	nats-server cluster cluster-test demo-cluster docs-images

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=25.1"
	$(PY) -m pip install -q --disable-pip-version-check -e . --group test --group lint --group build
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hongbao demo $(DEMO_ARGS)

demo-cluster: $(STAMP) nats-server
	$(VENV)/bin/hongbao demo --cluster $(DEMO_ARGS)

# The report's peak plot shown in the README: a fresh demo run with a fixed seed.
docs-images: $(STAMP)
	rm -rf build/docs-demo
	$(VENV)/bin/hongbao demo --seed 2026 --out build/docs-demo
	cp build/docs-demo/peak.png docs/demo-peak.png

# h2load (Debian's nghttp2-client) is the overload test's load generator.
H2LOAD := $(shell command -v h2load)
h2load:
ifeq ($(H2LOAD),)
	apt-get update -qq && apt-get install -y -qq nghttp2-client
endif

# nats-server 2.9 (Debian) runs the cluster's JetStream in the cluster tests.
NATS_SERVER := $(shell command -v nats-server)
nats-server:
ifeq ($(NATS_SERVER),)
	apt-get update -qq && apt-get install -y -qq nats-server
endif

test: $(STAMP) h2load nats-server
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)
	HONGBAO_HOTPATH=pure $(PY) -m pytest -q tests/test_ledger.py

# A local cluster on loopback in the foreground (3 NATS nodes, the bank simulator, SETS SETs;
# Ctrl-C stops it), and the cluster suite alone (it is part of `make test` too).
SETS ?= 3
IDCS ?= 1
CLUSTER_DIR ?= build/cluster
cluster: $(STAMP) nats-server
	$(PY) -m gateway.ops.cluster_up --dir $(CLUSTER_DIR) --sets $(SETS) --idcs $(IDCS)

cluster-test: $(STAMP) nats-server
	$(PY) -m pytest -q tests/test_cluster_*.py tests/test_cross_set_credit.py $(PYTEST_ARGS)

# The hot path with its internal checks compiled in (asyncpg's debug build), tested, then
# the release build put back whatever the tests said. The generated .c files go first both
# times: cythonize regenerates a .c only when its .pyx is newer, and the debug directives
# (boundscheck, initializedcheck) are in the .c, not in the compiler flags.
REBUILD := $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e .
debug-test: $(STAMP)
	rm -f hotpath/*.c
	HONGBAO_DEBUG=1 $(REBUILD)
	$(PY) -m pytest -q tests/test_hotpath.py tests/test_ledger.py; status=$$?; \
		rm -f hotpath/*.c; $(REBUILD) && exit $$status

soak: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The long fault campaign (about 5 minutes; SEED=N replays one) with its table appended to
# docs/RELIABILITY.md, then 20,000 seeded simulations (about 7 minutes on two cores), then
# the fuzz tests at 20,000 examples each.
CHAOS_CYCLES ?= 60
SIM_SEEDS ?= 20000
chaos: $(STAMP)
	$(PY) -m gateway.ops.cli chaos --cycles $(CHAOS_CYCLES) $(if $(SEED),--seed $(SEED)) \
		--report docs/RELIABILITY.md
	$(PY) -m gateway.ops.cli sim --seeds $(SIM_SEEDS)
	HONGBAO_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_fuzz.py

# Seeded simulations alone: `make sim` (SIM_SEEDS, default 20,000), `make sim SEED=N` replays one.
sim: $(STAMP)
	$(PY) -m gateway.ops.cli sim $(if $(SEED),--seed $(SEED),--seeds $(SIM_SEEDS))

# mypy reads its settings from pyproject.toml ([tool.mypy]); stubtest checks the .pyi stubs
# of the Cython modules against the build, so the stubs cannot drift from the .pyx.
lint: $(STAMP)
	$(VENV)/bin/ruff check gateway hotpath banksim tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/stubtest --allowlist hotpath/stubtest-allowlist.txt \
		hotpath._gate hotpath._split hotpath._records
	cd protos && npx --yes @bufbuild/buf@1.47.2 lint

# The benchmarks' peers and load generators: Debian's redis-server (BatchGrab against Redis +
# Lua) and nghttp2-client (h2load), installed when missing; the `bench` dependency group.
REDIS := $(shell command -v redis-server)
redis:
ifeq ($(REDIS),)
	apt-get update -qq && apt-get install -y -qq redis-server
endif

bench: $(STAMP) h2load redis
	$(PY) -m pip install -q --disable-pip-version-check --group bench -e .
	$(VENV)/bin/hongbao bench

# One worker overloaded to 3x its capacity, admission on and off; a PNG report and the figures
# (bench/overload.png, bench/RESULTS.md). A script of its own: it spawns its load generators.
bench-overload: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --group bench -e .
	$(PY) bench/bench_overload.py

protos: $(STAMP)
	$(PY) protos_build.py

clean:
	rm -rf $(VENV) build *.egg-info hongbao banksim/v1 hotpath/*.c hotpath/*.so hotpath/*.html
	find . -name __pycache__ -prune -exec rm -rf {} +

# A FileDescriptorSet of the hongbao.v1 protos and everything they import, for tools that
# take one instead of reflection (`ghz --protoset`, `grpcurl -protoset`). The include paths
# are protos_build.py's: protos/ and grpcio-tools' well-known types.
PROTOSET ?= build/hongbao.protoset
.PHONY: protoset
protoset: $(STAMP)
	mkdir -p $(dir $(PROTOSET))
	$(PY) -m grpc_tools.protoc -Iprotos \
		-I"$$($(PY) -c 'import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")')" \
		--include_imports --descriptor_set_out=$(PROTOSET) $(sort $(wildcard protos/hongbao/v1/*.proto))
