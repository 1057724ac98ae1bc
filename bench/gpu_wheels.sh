#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU machines this project borrows (Python 3.12,
# torch 2.11, transformers 5.17, huggingface-hub 1.33, tokenizers 0.23.2, no network): the
# transformers prime is tested with (5.24.0, the oldest requirements.txt allows: it accepts that
# huggingface-hub and tokenizers, where 5.25 asks for a newer hub and more) and the math verifier.
# Downloaded here into .whl/ (git-ignored), about 14 MB; carry .whl to the GPU machine with the tree.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2
du -sh .whl
