# The two commands of README.md. Both do all set-up on a fresh Debian 12 machine
# (as root) through scripts/setup.sh, which skips what is already done.
.PHONY: setup demo test lint bench

setup:
	./scripts/setup.sh

demo: setup
	.venv/bin/python -m appliance.demo

test: setup
	.venv/bin/python -m pytest -q -ra tests

lint:
	.venv/bin/ruff check appliance tests bench
	.venv/bin/mypy appliance

bench: setup
	.venv/bin/python bench/boot.py
