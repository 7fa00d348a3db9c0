# Two entry points: `make demo` (the whole study on the built-in digits data) and `make test`.
# Both create .venv from requirements.txt (the runtime packages) the first time; `make test` adds
# requirements-test.txt (pytest). `make cifar10-small` runs the small real-data replication of
# results/cifar10_small/report.md (78 minutes on a 2-core CPU).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# The test tools (pytest) on top of the runtime packages: `make demo` never installs them.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) bash demo.sh

# The CIFAR-10 study: ResNet-18 at 32 px (standard stem), 4 epochs, 9 objectives x 2 seeds on
# classes 0-4; linear probe on classes 5-9, clothing photos and Fashion-MNIST; fine-tuning on the
# clothing photos. SHARED holds the .npz data sets (cifar10/, clothing_small/, fashion_mnist/).
SHARED ?= ../shared/data
cifar10-small: $(VENV)/.installed
	DATA=npz:$(SHARED)/cifar10@0-4 \
	TARGETS="npz:$(SHARED)/cifar10@5-9,per_class=2000 npz:$(SHARED)/clothing_small npz:$(SHARED)/fashion_mnist@per_class=300" \
	FT_TARGETS=npz:$(SHARED)/clothing_small \
	ARCH=resnet18 EPOCHS=4 BATCH=128 \
	TRAIN_ARGS="--no-small-input --warmup-epochs 0.5 --ema-epochs 0.5" \
	FT_ARGS="--lrs 0.05 0.2 0.8 --wds 1e-4 --epochs 3 --batch-size 64" \
	CKA_ARGS="--split val --max-images 1000" SEP_ARGS="--max-per-class 500" \
	OUT=results/cifar10_small PYTHON=$(abspath $(PY)) bash demo.sh

# The CIFAR-10 coarse study (results/cifar10_coarse/README.md): learning-rate grid, every
# network, their analyses, the report, the learning-rate control (hours of CPU; resumable:
# rerun to continue).
cifar10-coarse: $(VENV)/.installed
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/study.py train
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/study.py analyze
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/study.py report
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/study.py control

# The paper's protocol on the same study (results/cifar10_coarse/README.md, "The paper's
# protocol"): all nine objectives at one learning rate, the rate as a factor. Resumable.
# `make cifar10-coarse-one-rate ARGS=--dry-run` prints every command it would run.
cifar10-coarse-one-rate: $(VENV)/.installed
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/one_rate.py train $(ARGS)
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/one_rate.py analyze $(ARGS)
	SHARED=$(SHARED) $(PY) results/cifar10_coarse/one_rate.py report $(ARGS)

.PHONY: venv test demo cifar10-small cifar10-coarse cifar10-coarse-one-rate
