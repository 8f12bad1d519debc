# Two commands do everything on a fresh Debian machine (see README.md):
#   make run    set up and run eqmail in the foreground on this checkout's instance
#   make test   run the whole test suite (ruff, mypy --strict, pytest)
SHELL := /bin/bash
.PHONY: run test lint bootstrap

run:
	@venv=$$(scripts/bootstrap.sh | tail -1); \
	if [ ! -f control/me ]; then "$$venv/bin/eqmailctl" --root "$(CURDIR)" setup; fi; \
	exec "$$venv/bin/eqmailctl" --root "$(CURDIR)" start --foreground

test:
	@venv=$$(scripts/bootstrap.sh | tail -1); \
	"$$venv/bin/ruff" check eqmail tests && \
	"$$venv/bin/mypy" --strict eqmail && \
	EQMAIL_VENV="$$venv" "$$venv/bin/pytest" -q -p no:cacheprovider tests

lint:
	@venv=$$(scripts/bootstrap.sh | tail -1); "$$venv/bin/ruff" check eqmail tests

bootstrap:
	@scripts/bootstrap.sh
