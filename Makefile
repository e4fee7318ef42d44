# qsens — per-layer quantization sensitivity for Qwen3-VL. See README.md.
#
#   make demo      every stage on the generated demo set (no downloads)
#   make test      the test suite (what CI runs through .ci/run)
#   make report    the pipeline on your own model/data (set the variables below), with the
#                  measured evaluation of the recipe in the report (EVALUATE=0: without)
#   make quantize  also write the FP8 checkpoint ($(OUTPUT_DIR)/checkpoint-fp8); make all: both
#   make score SHARDS=N -jN   score in N processes (cuda:i each with DEVICE=cuda), then merge
#
# Each stage is a file target, so make reruns only what changed: touching the manifest reruns
# only manifest-to-md; changing BITS reruns search and the report; changing the images reruns
# everything after calib-extract.

CARGO        ?= cargo
PROFILE      ?= release
CARGO_FLAGS  ?=
BIN_DIR      ?= $(or $(CARGO_TARGET_DIR),target)/$(PROFILE)

# ---- inputs ----------------------------------------------------------------------------------
# Defaults point at the demo set that `make demo-assets` generates.
DEMO_DIR     ?= target/demo
MODEL_DIR    ?= $(DEMO_DIR)/model
IMAGE_ROOT   ?= $(DEMO_DIR)/images
# A COCO captions JSON to build CALIB_DB from (leave empty to use an existing CALIB_DB).
COCO_JSON    ?= $(DEMO_DIR)/captions.json
CALIB_DB     ?= $(OUTPUT_DIR)/calibration.db
SPLIT        ?=

# ---- settings --------------------------------------------------------------------------------
OUTPUT_DIR   ?= tmp/qwen3_vl_4b_autoquant_all_layers_fp8
NUM_SAMPLES  ?= 32
SEED         ?= 0
PROMPT       ?= Describe this image.
MIN_PIXELS   ?=
MAX_PIXELS   ?=
METHOD       ?= gradient
DEVICE       ?= cpu
DTYPE        ?= f32
BITS         ?= 12
DISABLE      ?=
EXCLUDE_COST ?=
SCORE_FLAGS  ?=
SEARCH_FLAGS ?=
# Score in SHARDS processes (run them together with `make -j SHARDS`), then merge: the artifact
# is byte-identical to one process's. With DEVICE=cuda, shard i runs on cuda:i (docs/sharding.md).
SHARDS       ?= 1
# Held-out samples for `evaluate` (drawn disjoint from the calibration set) and frontier recipes.
NUM_EVAL     ?= 32
FRONTIER     ?= 8
EVALUATE     ?= 1
EVALUATE_FLAGS ?=
# `quantize`: checkpoint layout (auto, modelopt, compressed-tensors) and extra flags.
LAYOUT       ?= auto
QUANTIZE_FLAGS ?=

# ---- outputs (same folder and roles as the ModelOpt driver's) ---------------------------------
PREFIX       := fp8_autoquant_all_layers_fp8
CALIBRATION  := $(OUTPUT_DIR)/calibration.json
INPUTS       := $(OUTPUT_DIR)/model_inputs.msgpack
SCORES       := $(OUTPUT_DIR)/$(PREFIX)_autoquant_state.msgpack
MANIFEST     := $(OUTPUT_DIR)/$(PREFIX)_quant_manifest.json
REPORT       := $(OUTPUT_DIR)/per-layer-sensitivity.md
EXPORT_DIR   := $(OUTPUT_DIR)/recipes
EVAL_SAMPLES := $(OUTPUT_DIR)/evaluation_samples.json
EVAL_INPUTS  := $(OUTPUT_DIR)/evaluation_inputs.msgpack
EVALUATION   := $(OUTPUT_DIR)/evaluation.msgpack
CHECKPOINT   := $(OUTPUT_DIR)/checkpoint-fp8

BINS := calib-extract preprocess score-layers search manifest-to-md quantize evaluate
BIN_FILES := $(addprefix $(BIN_DIR)/,$(BINS))

.PHONY: all demo demo-assets build build-cuda score report evaluate quantize test bench bench-preprocess bench-model bench-score \
        fuzz clean-output help FORCE
all: report quantize

help:
	@sed -n '1,13p' Makefile

# ---- build -----------------------------------------------------------------------------------
build:
	$(CARGO) build --$(PROFILE) --bins $(CARGO_FLAGS)

# CUDA build (no GPU needed to build; docs/cuda.md): CUDA 13.0 toolchain from PyPI, then the
# `cuda` feature. Binaries land in target/release as usual.
CUDA_ENV ?= $(HOME)/.qsens-cuda
build-cuda:
	test -f $(CUDA_ENV)/env.sh || scripts/setup-cuda-build-env.sh $(CUDA_ENV)
	. $(CUDA_ENV)/env.sh && $(CARGO) build --release --bins --features cuda

# Stages depend on the binaries only for ordering: rebuilding qsens does not rerun the pipeline.
$(BIN_FILES) $(BIN_DIR)/demo-assets: build

# ---- demo ------------------------------------------------------------------------------------
# demo-assets is a binary (not an example) so that `build` compiles it along with the stages,
# with the same dependency features: no second compile of the library.
demo-assets: $(BIN_DIR)/demo-assets
	$(BIN_DIR)/demo-assets $(DEMO_DIR)

demo:
	@$(MAKE) --no-print-directory demo-assets
	@$(MAKE) --no-print-directory all OUTPUT_DIR=tmp/demo NUM_SAMPLES=6 NUM_EVAL=3 FRONTIER=4 BITS=12 \
	    EXCLUDE_COST='*lm_head*'
	@echo
	@echo "demo report: tmp/demo/per-layer-sensitivity.md (plots beside it)"
	@echo "manifest:    tmp/demo/$(PREFIX)_quant_manifest.json; recipes: tmp/demo/recipes/"
	@echo "evaluation:  tmp/demo/evaluation.msgpack; FP8 checkpoint: tmp/demo/checkpoint-fp8/"

# ---- settings stamps: a stage reruns when its settings change, not only its input files -------
# $(call stamp,NAME,VALUE) names a file whose content is VALUE; it is rewritten (and so newer)
# only when VALUE differs from what it holds.
stamp = $(OUTPUT_DIR)/.$(1).settings
define stamp_rule
$(call stamp,$(1)): FORCE
	@mkdir -p $$(@D)
	@printf '%s\n' '$(2)' | cmp -s - $$@ 2>/dev/null || printf '%s\n' '$(2)' > $$@
endef
EXTRACT_SETTINGS := $(NUM_SAMPLES) $(SEED) $(PROMPT) $(SPLIT) $(IMAGE_ROOT)
PREPROCESS_SETTINGS := $(MODEL_DIR) $(MIN_PIXELS) $(MAX_PIXELS)
SCORE_SETTINGS := $(MODEL_DIR) $(METHOD) $(DEVICE) $(DTYPE) $(DISABLE) $(EXCLUDE_COST) $(SCORE_FLAGS)
SEARCH_SETTINGS := $(BITS) $(DISABLE) $(EXCLUDE_COST) $(SEARCH_FLAGS)
EVAL_EXTRACT_SETTINGS := $(NUM_EVAL) $(SEED) $(PROMPT) $(SPLIT) $(IMAGE_ROOT)
EVALUATE_SETTINGS := $(MODEL_DIR) $(FRONTIER) $(DEVICE) $(DTYPE) $(EVALUATE_FLAGS)
QUANTIZE_SETTINGS := $(MODEL_DIR) $(LAYOUT) $(QUANTIZE_FLAGS)
$(eval $(call stamp_rule,extract,$(EXTRACT_SETTINGS)))
$(eval $(call stamp_rule,preprocess,$(PREPROCESS_SETTINGS)))
$(eval $(call stamp_rule,score,$(SCORE_SETTINGS)))
$(eval $(call stamp_rule,search,$(SEARCH_SETTINGS)))
$(eval $(call stamp_rule,eval-extract,$(EVAL_EXTRACT_SETTINGS)))
$(eval $(call stamp_rule,evaluate,$(EVALUATE_SETTINGS)))
$(eval $(call stamp_rule,quantize,$(QUANTIZE_SETTINGS)))
FORCE:

opt = $(if $(2),$(1) '$(2)')
glob_flags = $(foreach g,$(2),$(1) '$(g)')

# ---- stage 1: calib-extract ------------------------------------------------------------------
ifneq ($(COCO_JSON),)
$(CALIB_DB): $(COCO_JSON) | $(BIN_DIR)/calib-extract
	@mkdir -p $(@D)
	$(BIN_DIR)/calib-extract --from-coco $(COCO_JSON) --db $@ $(call opt,--split,$(SPLIT))
endif

$(CALIBRATION): $(CALIB_DB) $(call stamp,extract) | $(BIN_DIR)/calib-extract
	$(BIN_DIR)/calib-extract --db $(CALIB_DB) --image-root $(IMAGE_ROOT) --num $(NUM_SAMPLES) \
	    --seed $(SEED) --prompt '$(PROMPT)' $(call opt,--split,$(SPLIT)) -o $@

# ---- stage 2: preprocess ---------------------------------------------------------------------
$(INPUTS): $(CALIBRATION) $(MODEL_DIR)/config.json $(call stamp,preprocess) | $(BIN_DIR)/preprocess
	$(BIN_DIR)/preprocess --calibration $(CALIBRATION) --model $(MODEL_DIR) \
	    $(call opt,--min-pixels,$(MIN_PIXELS)) $(call opt,--max-pixels,$(MAX_PIXELS)) -o $@

# ---- stage 3: score-layers (resumes an interrupted run from $(SCORES).partial) ------------------
SCORE_ARGS = --model $(MODEL_DIR) --inputs $(INPUTS) --method $(METHOD) --dtype $(DTYPE) \
	    $(call glob_flags,--disable,$(DISABLE)) $(call glob_flags,--exclude-cost,$(EXCLUDE_COST)) --resume $(SCORE_FLAGS)
ifeq ($(SHARDS),1)
$(SCORES): $(INPUTS) $(MODEL_DIR)/config.json $(call stamp,score) | $(BIN_DIR)/score-layers
	$(BIN_DIR)/score-layers $(SCORE_ARGS) --device $(DEVICE) -o $@
else
# Shard i of N scores the samples with index ≡ i (mod N), each its own process (one GPU each
# with DEVICE=cuda); the merge checks that the shards come from one run and cover every sample.
SHARD_FILES := $(foreach i,$(shell seq 0 $$(($(SHARDS) - 1))),$(SCORES:.msgpack=).shard-$(i)-of-$(SHARDS).msgpack)
shard_device = $(if $(filter cuda,$(DEVICE)),cuda:$(1),$(DEVICE))
$(SHARD_FILES): $(SCORES:.msgpack=).shard-%-of-$(SHARDS).msgpack: $(INPUTS) $(MODEL_DIR)/config.json \
	    $(call stamp,score) | $(BIN_DIR)/score-layers
	$(BIN_DIR)/score-layers $(SCORE_ARGS) --shard $*/$(SHARDS) --device $(call shard_device,$*) -o $@
$(SCORES): $(SHARD_FILES) | $(BIN_DIR)/score-layers
	$(BIN_DIR)/score-layers --merge $(SHARD_FILES) -o $@
endif
score: $(SCORES)

# ---- stage 4: search -------------------------------------------------------------------------
$(MANIFEST): $(SCORES) $(call stamp,search) | $(BIN_DIR)/search
	$(BIN_DIR)/search --scores $(SCORES) --effective-bits $(BITS) \
	    $(call glob_flags,--disable,$(DISABLE)) $(call glob_flags,--exclude-cost,$(EXCLUDE_COST)) \
	    --export-dir $(EXPORT_DIR) $(SEARCH_FLAGS) -o $@

# ---- evaluate: held-out samples (disjoint from the calibration set), measured recipes ----------
$(EVAL_SAMPLES): $(CALIB_DB) $(CALIBRATION) $(call stamp,eval-extract) | $(BIN_DIR)/calib-extract
	$(BIN_DIR)/calib-extract --db $(CALIB_DB) --image-root $(IMAGE_ROOT) --num $(NUM_EVAL) \
	    --seed $(SEED) --prompt '$(PROMPT)' $(call opt,--split,$(SPLIT)) --exclude $(CALIBRATION) -o $@

$(EVAL_INPUTS): $(EVAL_SAMPLES) $(MODEL_DIR)/config.json $(call stamp,preprocess) | $(BIN_DIR)/preprocess
	$(BIN_DIR)/preprocess --calibration $(EVAL_SAMPLES) --model $(MODEL_DIR) \
	    $(call opt,--min-pixels,$(MIN_PIXELS)) $(call opt,--max-pixels,$(MAX_PIXELS)) -o $@

$(EVALUATION): $(EVAL_INPUTS) $(MANIFEST) $(call stamp,evaluate) | $(BIN_DIR)/evaluate
	$(BIN_DIR)/evaluate --model $(MODEL_DIR) --inputs $(EVAL_INPUTS) --manifest $(MANIFEST) \
	    --frontier $(FRONTIER) --device $(DEVICE) --dtype $(DTYPE) $(EVALUATE_FLAGS) -o $@

evaluate: $(EVALUATION)
	@echo "evaluation: $(EVALUATION)"

# ---- stage 5: manifest-to-md (with the evaluation unless EVALUATE=0) ---------------------------
REPORT_EVALUATION := $(if $(filter 1,$(EVALUATE)),$(EVALUATION))
$(REPORT): $(MANIFEST) $(REPORT_EVALUATION) | $(BIN_DIR)/manifest-to-md
	$(BIN_DIR)/manifest-to-md --manifest $(MANIFEST) $(call opt,--evaluation,$(REPORT_EVALUATION)) -o $@

report: $(REPORT)
	@echo "report: $(REPORT)"

# ---- quantize: the FP8 checkpoint of the manifest (docs/quantize.md) ----------------------------
$(CHECKPOINT)/config.json: $(MANIFEST) $(SCORES) $(MODEL_DIR)/config.json $(call stamp,quantize) | $(BIN_DIR)/quantize
	$(BIN_DIR)/quantize --model $(MODEL_DIR) --manifest $(MANIFEST) --scores $(SCORES) --layout $(LAYOUT) \
	    $(QUANTIZE_FLAGS) --force -o $(CHECKPOINT)

quantize: $(CHECKPOINT)/config.json
	@echo "checkpoint: $(CHECKPOINT)"

clean-output:
	rm -rf $(OUTPUT_DIR)

# ---- tests and benchmarks --------------------------------------------------------------------
# Tests that compare against ../shared/fixtures skip themselves when it is absent (libtest hides
# their notice, so it is said here); .ci/run sets QSENS_REQUIRE_FIXTURES=1 to make absence fail.
test:
	@d="$${QSENS_FIXTURES:-../shared/fixtures}"; [ -f "$$d/README.md" ] || \
	  echo "make test: no fixtures at $$d (set QSENS_FIXTURES): the reference-comparison tests are skipped"
	$(CARGO) test --all-targets

# Fuzzing: the fuzz targets of tests/reliability for FUZZ_SECS seconds each, from fresh random
# seeds (make test runs them for 60 s each from fixed seeds). A crash prints its seed
# (rerun with QSENS_FUZZ_SEED=<seed>) and the shrunk input.
FUZZ_SECS    ?= 600
FUZZ_SEED    ?= random
fuzz:
	QSENS_FUZZ_SECS=$(FUZZ_SECS) QSENS_FUZZ_SEED=$(FUZZ_SEED) $(CARGO) test --test reliability $(CARGO_FLAGS) -- fuzz_ --nocapture

bench: bench-preprocess bench-model bench-score

bench-preprocess:
	scripts/bench_preprocess.sh

bench-model:
	scripts/bench_model.sh

bench-score:
	scripts/bench_score.sh
