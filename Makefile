# The two commands of the README. Each first runs setup/install.sh, which installs only what is missing.
.PHONY: demo analyze test setup gpu-kit

demo: setup
	.venv/bin/python -m stages.pipeline --config recipes/tiny.yaml

# the paper's analyses on the embedded default, after `make demo`
analyze: setup
	.venv/bin/python -m stages.analyze scaling --config recipes/tiny.yaml
	.venv/bin/python -m stages.analyze diagnostics --config recipes/tiny.yaml

test: setup
	.venv/bin/python -m pytest -q

# the wheels the GPU kit carries to the device machine (bench/gpu_kit.py; then, there: bash bench/gpu_bench.sh "$OUT")
gpu-kit: setup
	.venv/bin/python -m bench.gpu_kit prepare

setup:
	bash setup/install.sh
