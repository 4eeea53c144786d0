# Two entry points (see README): `make demo` renders the bundled prompts with the
# tiny checkpoint on local Ray; `make test` runs the whole test suite. Both build
# their own virtual environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# One resolver run for everything, so s3fs and moto agree on botocore.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cogview-ray render configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) outputs .cache
