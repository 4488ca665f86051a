# The two set-up commands of the README are `make bench` and `make test`; both start from a
# fresh machine. `make check` is the fast part, run before every commit.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: bench test check lint venv clean mutants run-programs

$(STAMP): pyproject.toml constraints-dev.txt $(wildcard src/fable/_core/*.[ch] src/fable/_shim/*.c src/fable/bench/*.c)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-dev.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The test hosts' ZooKeeper (fable.testing.cluster): the Debian package, installed when missing
# (root: CI runs as root; elsewhere install it once by hand, or `make check` fails there).
ZK_JAR := /usr/share/java/zookeeper.jar
$(ZK_JAR):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends zookeeper

# The unmodified programs `fable run`'s slow tests run (tests/test_run_programs.py): Debian's,
# installed when one is missing (root, as for ZooKeeper).
RUN_PROGRAMS := redis-server redis-benchmark redis-cli nginx socat wrk curl
run-programs:
	@missing=; for p in $(RUN_PROGRAMS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing what provides:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends redis-server redis-tools nginx socat wrk curl; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

bench: $(STAMP)
	mkdir -p bench-results
	$(BIN)/fable bench --quick --plot bench-results/ --json bench-results/run.json

check: lint $(ZK_JAR)
	$(BIN)/pytest -m "not slow" -q

# The fast suite under coverage (this process and the fable processes it spawns; forked
# children are not measured: saving ~3000 children's data cost 2 minutes; the floor is
# fail_under in pyproject.toml) with 1,100 fds opened first (every fd fable opens is then above
# 1024; `make check` runs the suite without them), then the slow suite (fuzzing, stress,
# scenarios) without coverage.
test: lint $(ZK_JAR) run-programs
	rm -rf .coverage-data
	FABLE_TEST_EXTRA_FDS=1100 $(BIN)/coverage run -m pytest -m "not slow" -q
	$(BIN)/coverage combine -q
	$(BIN)/coverage report
	$(BIN)/pytest -m slow -q

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage-data

# Curated faults the fast suite must catch (tests/mutants.py); about 10 minutes, not in `make test`.
mutants: $(STAMP)
	$(BIN)/python tests/mutants.py
