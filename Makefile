# The two set-up commands of the README. Each one installs what it needs (scripts/setup.sh).
.PHONY: setup demo test

setup:
	./scripts/setup.sh

# Set up, then run the main job on the built-in demo corpus.
demo: setup
	.venv/bin/pcav demo

# Set up, then run the whole test suite (CI runs exactly this through .ci/run).
test: setup
	.venv/bin/python -m pytest -q -rs  # -rs: say why each skipped test was skipped (only GPU tests may skip)
