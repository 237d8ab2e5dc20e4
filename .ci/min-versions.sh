#!/usr/bin/env bash
# The declared floor is what CI tests: install dpmjax without extras, under the minimum
# versions of its core dependencies (.ci/min-versions.txt), into a fresh venv, and run a
# quick subset of the sampling, fitting and file tests there (about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
venv="$(realpath -m "${1:-.venv-ci-min}")"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -c .ci/min-versions.txt . "pytest>=7"
# the pins really are what got installed (pip would fail on a conflict, but say it here)
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
pins = [l.split("==") for l in open(".ci/min-versions.txt") if "==" in l and not l.startswith("#")]
got = {name: md.version(name) for name, _ in pins}
bad = {n: (v.strip(), got[n]) for n, v in pins if got[n] != v.strip()}
assert not bad, f"installed versions differ from the pins: {bad}"
print("minimum versions:", ", ".join(f"{n} {v}" for n, v in got.items()))
PY
# run from a directory outside the checkout, so the installed dpmjax is what is tested
cd "$(mktemp -d)"
cp -r "$root/tests" .
"$venv/bin/python" -m pytest -q -p no:cacheprovider -o addopts="" \
  tests/test_files.py \
  tests/test_fit.py::test_save_load_round_trip \
  tests/test_fit.py::test_load_rejects_bad_files \
  tests/test_fit.py::test_fitting_reduces_the_exact_error_on_fresh_noise \
  tests/test_sampler.py::test_model_types_agree \
  tests/test_sampler.py::test_order1_is_ddim_for_both_algorithms \
  tests/test_sampler.py::test_cfg_equals_manual_combination \
  "tests/test_sampler.py::test_matches_reference[multistep-o2-taylor-dpmsolver++-time_uniform-discrete-N7]" \
  "tests/test_sampler.py::test_matches_reference[multistep-o2-dpmsolver-dpmsolver-time_uniform-discrete-N7]"
