# The two commands a new user needs: `make demo` and `make test`. Both set the machine up first.
PY := .venv/bin/python

.PHONY: setup lock demo check test test-all soak bench benches up down clean

setup:
	@bin/setup

# After a change to the dependencies in setup.cfg: the hashed locks in requirements/ that bin/setup and
# the image install from (needs python3.11 and PyPI).
lock:
	requirements/compile

demo: setup
	bin/btcfeed demo

# The edit loop (under a minute): lint (flake8's pyflakes checks, syntax errors and lines over 110
# columns; setup.cfg lists the files not yet held to the length) and the fast tier, the tests that
# start no stack (they still use real redis-server where they need one).
check: setup
	$(PY) -m flake8 --select F,E9,E501 setup.py common processes tools tests
	$(PY) -m pytest -q -m "not integration and not slow and not chaos"

# The default test run: unit and integration tests against real redis-server, supervisord and
# the exchange simulator, two at a time (pytest-xdist): most of a stack test's time is spent waiting
# on real faults and timeouts, not on the CPU. Long soaks are in `make soak`.
test: setup
	$(PY) -m pytest -n 2 --durations=15 -m "not slow and not chaos"

test-all: setup
	$(PY) -m pytest

soak: setup
	$(PY) -m pytest -m "slow or chaos"

bench: setup
	bin/btcfeed bench

# Every benchmark, one after the other (about 30 minutes): the figures in the README.
benches: setup
	bin/btcfeed bench
	bin/btcfeed bench-failover
	bin/btcfeed bench-backfill
	bin/btcfeed bench-parse
	bin/btcfeed bench-health
	bin/btcfeed bench-primary
	bin/btcfeed bench-cost
	bin/btcfeed bench-memory
	bin/btcfeed bench-move
	bin/btcfeed bench-reseed
	bin/btcfeed bench-stream
	bin/btcfeed bench-availability --hosts 2

up: setup
	bin/btcfeed up

down:
	bin/btcfeed down

clean:
	rm -rf var .pytest_cache .hypothesis
