# The two commands a new user needs: `make demo` and `make test`. Both set the machine up first.
PY := .venv/bin/python

.PHONY: setup lock demo test test-all soak bench benches up down clean

setup:
	@bin/setup

# After a change to the dependencies in setup.cfg: the hashed locks in requirements/ that bin/setup and
# the image install from (needs python3.11 and PyPI).
lock:
	requirements/compile

demo: setup
	bin/btcfeed demo

# The default test run: unit and integration tests against real redis-server, supervisord and
# the exchange simulator (about 12 minutes on 2 cores). Long soaks are in `make soak`.
test: setup
	$(PY) -m pytest -m "not slow and not chaos"

test-all: setup
	$(PY) -m pytest

soak: setup
	$(PY) -m pytest -m "slow or chaos"

bench: setup
	bin/btcfeed bench

# Every benchmark, one after the other (about 10 minutes): the figures in the README.
benches: setup
	bin/btcfeed bench
	bin/btcfeed bench-failover
	bin/btcfeed bench-backfill
	bin/btcfeed bench-parse
	bin/btcfeed bench-health
	bin/btcfeed bench-primary

up: setup
	bin/btcfeed up

down:
	bin/btcfeed down

clean:
	rm -rf var .pytest_cache .hypothesis
