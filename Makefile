# make demo : train the demo ViT on Fashion-MNIST, then quantize it (installs what it needs)
# make test : run the test suite (installs what it needs)
# make deit-tiny : the deeper DeiT-Tiny-shape model (12x192, patch 4), trained then quantized
# make vit-197 : a 197-token model (patch 2 on 28x28: 196 patches + class token), trained then quantized
# make vit-s16 : a ViT-S/16 at 224 px (timm's constructor, random weights) quantized end to end
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
FMNIST_DIR := /usr/share/datasets/fashion-mnist
OUT ?= output/demo

# The demo preset (chosen by measurement; see docs/BENCHMARKS.md).
DEMO_TRAIN_ARGS ?= --epochs 10 --batch-size 128 --img-size 28 --patch-size 7 --embed-dim 128 \
	--depth 6 --num-heads 4 --num-classes 10 --lr 5e-4 --warmup-epochs 1 --augment flip

# The deeper model of the PTQ study: DeiT-Tiny's shape (embed 192, depth 12, 3 heads) with
# patch 4 (50 tokens) on 28x28 Fashion-MNIST, bfloat16 autocast; ~10-17 min per epoch here.
DEIT_OUT ?= output/deit-tiny
DEIT_TRAIN_ARGS ?= --epochs 4 --batch-size 128 --img-size 28 --patch-size 4 --embed-dim 192 \
	--depth 12 --num-heads 3 --num-classes 10 --lr 5e-4 --warmup-epochs 0.5 --augment flip --amp

# The 197-token model (issue 17): ImageNet's sequence length on Fashion-MNIST, patch 2, 6x96,
# 3 heads (0.69M parameters), bfloat16 autocast, 3 epochs (~15-30 min per epoch here).
VIT197_OUT ?= output/vit-197
VIT197_TRAIN_ARGS ?= --epochs 3 --batch-size 128 --img-size 28 --patch-size 2 --embed-dim 96 \
	--depth 6 --num-heads 3 --num-classes 10 --lr 5e-4 --warmup-epochs 0.3 --augment flip --amp
VIT197_PTQ_ARGS ?= --w-bits 8 6 4 4 3 --a-bits 8 6 8 4 3


# ViT-S/16 at 224 px (197 tokens): a timm state dict from timm's own constructor (random weights,
# nothing downloaded: accuracy is meaningless, the run shows memory and time per stage) and a
# 10-class folder of 224-px images (Fashion-MNIST upscaled: 300 train, 100 val).
# VIT_ARCH=vit_base_patch16_224 gives the ViT-B/16 of docs/BENCHMARKS.md.
VIT_OUT ?= output/vit-s16
VIT_ARCH ?= vit_small_patch16_224
VIT_PTQ_ARGS ?= --calib-size 256 --eval-subset 100 --latency-runs 5 --latency-batches 1 8

.PHONY: demo deit-tiny vit-197 vit-s16 test venv data clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || \
		$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Fashion-MNIST from Debian when it is missing (needs root); otherwise say what to do.
data:
	@if [ -e "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -n "$$BVVIT_FASHION_MNIST" ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; \
		echo "or set BVVIT_FASHION_MNIST to a folder holding the four IDX files"; \
		exit 1; \
	fi

# One pytest process per folder of tests/ (and one for the top-level test files): in a single
# long process, a fork for a subprocess test after ~200 others (transformers, timm,
# torchvision, ONNX Runtime, OpenVINO loaded in-process) ended in a segmentation fault of
# pytest itself on this machine (not traced yet; every test passes in its folder's process).
TEST_DIRS := $(filter-out tests/__pycache__/,$(wildcard tests/*/))
TEST_FILES := $(wildcard tests/test_*.py)

test: $(STAMP) data
	@status=0; for group in $(TEST_DIRS) "$(TEST_FILES)"; do \
		echo "== $$group"; $(PY) -m pytest -q -p no:cacheprovider $$group || status=1; \
	done; exit $$status

demo: $(STAMP) data
	$(PY) run.py --data-path fashion-mnist --output-dir $(OUT) $(DEMO_TRAIN_ARGS) --resume auto
	@if [ -f post_training.py ]; then \
		$(PY) post_training.py --model-path $(OUT)/vit_model.pth --output-dir $(OUT)/quantization; \
	fi

deit-tiny: $(STAMP) data
	$(PY) run.py --data-path fashion-mnist --output-dir $(DEIT_OUT) $(DEIT_TRAIN_ARGS) --resume auto
	$(PY) post_training.py --model-path $(DEIT_OUT)/vit_model.pth --output-dir $(DEIT_OUT)/quantization

vit-197: $(STAMP) data
	$(PY) run.py --data-path fashion-mnist --output-dir $(VIT197_OUT) $(VIT197_TRAIN_ARGS) --resume auto
	$(PY) post_training.py --model-path $(VIT197_OUT)/vit_model.pth --output-dir $(VIT197_OUT)/quantization \
		$(VIT197_PTQ_ARGS)

vit-s16: $(STAMP) data
	$(PY) tools/vit224_inputs.py --arch $(VIT_ARCH) --model $(VIT_OUT)/model.pth --data $(VIT_OUT)/images224
	$(PY) post_training.py --model-path $(VIT_OUT)/model.pth --data-path $(VIT_OUT)/images224 \
		--output-dir $(VIT_OUT)/quantization --overwrite $(VIT_PTQ_ARGS)
	@echo "Random weights: the accuracy above is meaningless; summary.json 'timings' has each stage's time."
	@echo "With your own timm/DeiT checkpoint on ImageNet (train/ and val/ of synset folders):"
	@echo "  $(PY) post_training.py --model-path YOUR_vit_s16.pth --data-path /path/to/imagenet --output-dir out/vit-s16"

clean:
	rm -rf $(VENV) output
