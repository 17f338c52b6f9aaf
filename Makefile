# Entry points (design.md §7). Everything runs from the repo's .venv; `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/image_to_sound/v1/*.proto)
PROTO_STAMP := protos/.generated
TINY := models/tiny

.PHONY: setup protos tiny-models test test-unit test-integration test-e2e demo run clean

setup: $(STAMP) $(PROTO_STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# The generated stubs import each other as image_to_sound.v1.*: put protos/ on the venv's path.
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'image_to_sound_protos.pth').write_text('$(CURDIR)/protos\n')"
	touch $@

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos --grpc_python_out=protos $(PROTO_SRC)
	touch $@

tiny-models: $(TINY)/vlm/config.json $(TINY)/audio/model_index.json

$(TINY)/vlm/config.json: | setup
	$(PY) -m vlm_service.tiny $(TINY)/vlm

$(TINY)/audio/model_index.json: | setup
	$(PY) -m audio_service.tiny $(TINY)/audio

test: setup
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-e2e: setup
	$(PY) -m pytest -q tests/e2e

# The whole job on tiny random-weight checkpoints: no network, CPU, noise instead of real sound.
demo: setup tiny-models
	$(PY) main.py --vlm_model $(TINY)/vlm --audio_model $(TINY)/audio --device cpu \
		--sound_sources_dir demo_out/sound_sources --result_dir demo_out/result \
		--audio_seconds 2 --audio_steps 8 --scene_mix --export_phase2 demo_out/phase2 $(ARGS)

# The main job: every image under data/ with the real models (downloads them on first use).
run: setup
	$(PY) main.py $(ARGS)

clean:
	rm -rf demo_out $(TINY) $(PROTO_STAMP) protos/image_to_sound/v1/*_pb2*.py*
