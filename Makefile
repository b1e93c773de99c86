# The two commands of the README. Each first runs setup/install.sh, which installs only what is missing.
.PHONY: demo test setup

demo: setup
	.venv/bin/python -m stages.pipeline --config recipes/tiny.yaml

test: setup
	.venv/bin/python -m pytest -q

setup:
	bash setup/install.sh
