# qsens — see README.md. `make demo` runs the pipeline on the embedded demo set; `make test` runs
# the test suite (CI runs it through .ci/run).
CARGO ?= cargo

.PHONY: build test
build:
	$(CARGO) build --release --bins

test:
	$(CARGO) test --all-targets
