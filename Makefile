# The two commands of the README. Each first runs setup/install.sh, which installs only what is missing.
.PHONY: demo toy analyze screenshots test docs setup gpu-kit

demo: setup
	.venv/bin/python -m stages.pipeline --config recipes/tiny.yaml
	@echo "make demo checks the plumbing: its tiny model does not learn to read the UDHR pages (README, Demo; docs/demo.md)."
	@echo "The method in miniature, a model that reads unseen pages and the refinements of it: make toy"

# the method in miniature (issue 29, recipes/toy.yaml): pages of random letters that a tiny model learns to read,
# text-only and multimodal refinement of it and of the random base, and the scaling analysis over the base and its
# 8 pretraining checkpoints
PYTHON = .venv/bin/python
toy: setup
	$(PYTHON) -m bench.toy_pages --output checkpoints/toy/pdfs --documents 2000 --pages 1 --seed 42
	$(PYTHON) -m bench.toy_pages --output checkpoints/toy/eval-pdfs --documents 10 --seed 7
	$(PYTHON) -m data_prep pages --config recipes/toy.yaml --input checkpoints/toy/pdfs --output checkpoints/toy/pages
	$(PYTHON) -m data_prep pages --config recipes/toy.yaml --input checkpoints/toy/eval-pdfs --output checkpoints/toy/eval-pages
	$(PYTHON) -m data_prep evalset --config recipes/toy.yaml --pages checkpoints/toy/eval-pages --output checkpoints/toy/evalset
	$(PYTHON) -m stages.base_model --config recipes/toy.yaml
	$(PYTHON) -m stages.pretrain --config recipes/toy.yaml
	$(PYTHON) -m stages.contrast --config recipes/toy.yaml
	$(PYTHON) -m stages.contrast --config recipes/toy.yaml --model_name_or_path checkpoints/toy/base --output_dir checkpoints/toy/contrast-only
	$(PYTHON) -m stages.contrast --config recipes/toy.yaml --multimodal_fraction 0.2 --output_dir checkpoints/toy/contrast-mm
	$(PYTHON) -m stages.contrast --config recipes/toy.yaml --multimodal_fraction 0.2 --model_name_or_path checkpoints/toy/base --output_dir checkpoints/toy/contrast-only-mm
	$(PYTHON) -m stages.evaluate --config recipes/toy.yaml --data checkpoints/toy/evalset --output checkpoints/toy/eval.json --model checkpoints/toy/contrast/final checkpoints/toy/contrast-only/final checkpoints/toy/contrast-mm/final checkpoints/toy/contrast-only-mm/final
	$(PYTHON) -m stages.analyze scaling --config recipes/toy.yaml

# the paper's analyses on the embedded default, after `make demo`
analyze: setup
	.venv/bin/python -m stages.analyze scaling --config recipes/tiny.yaml
	.venv/bin/python -m stages.analyze diagnostics --config recipes/tiny.yaml

# the report and the search page of `make demo` in headless Chromium at a phone's and a desktop's width, saved as
# docs/img/{report,search}-{phone,desktop}.png (bench/screenshots.py); the search page needs an index of the demo's pages
screenshots: setup
	test -f checkpoints/tiny/contrast-index/run_record.json || $(PYTHON) -m stages.index \
		--model checkpoints/tiny/contrast/final --input $(wildcard checkpoints/tiny/pages/*) --output checkpoints/tiny/contrast-index
	$(PYTHON) -m bench.screenshots

test: setup
	.venv/bin/python -m pytest -q

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link or a missing page fails the build.
# `python -m mkdocs` so that docs/hooks.py documents this checkout's code; no --quiet: it hides the warnings --strict counts
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

# the wheels the GPU kit carries to the device machine (bench/gpu_kit.py; then, there: bash bench/gpu_bench.sh "$OUT")
gpu-kit: setup
	.venv/bin/python -m bench.gpu_kit prepare

setup:
	bash setup/install.sh
