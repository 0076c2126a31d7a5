# Aliases for lab.py (which needs only Python): make demo | make test | make lab
PYTHON ?= python3
.PHONY: demo test lab install gpu strip bench
demo:
	$(PYTHON) lab.py demo
test:
	$(PYTHON) lab.py test
lab:
	$(PYTHON) lab.py lab
install:
	$(PYTHON) lab.py install
gpu:
	$(PYTHON) lab.py install --gpu
strip:
	.venv/bin/python scripts/strip_notebooks.py
bench:
	.venv/bin/python benchmarks/trie.py
