# Two commands: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
# Without an NVIDIA GPU, never pull the multi-GB CUDA build of torch: take a CPU wheel, either one
# pip already finds (a local wheelhouse) or PyTorch's CPU index.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: demo test install clean
demo: $(VENV)/.installed
	$(VENV)/bin/longreel generate configs/examples/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) install -q "$(TORCH)"
else
	$(PY) infra/install_cpu_torch.py "$(TORCH)"
endif
	$(PIP) install -q -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) outputs .pytest_cache
