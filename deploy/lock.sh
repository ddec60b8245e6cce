#!/usr/bin/env bash
# Resolve deploy/requirements.in (CPU) and deploy/requirements.gpu.in (GPU) into lock files with the
# sha256 of every wheel and sdist: deploy/requirements.lock.txt, deploy/requirements.gpu.lock.txt.
# The bentofiles install these (python.requirements_txt, pip_args --no-deps), so an image holds
# exactly the locked packages, each checked against its hash. Needs the package index (PyPI);
# run it after changing a pin, then `make bento` (the lock is part of the bento's digest).
#   deploy/lock.sh             (UV=/path/to/uv deploy/lock.sh to use another uv)
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
for flavour in "" ".gpu"; do
  # the images run CPython 3.11 on x86_64 glibc >= 2.28 (python:3.11-slim; the CUDA image, Ubuntu 24.04)
  "$UV" pip compile "deploy/requirements${flavour}.in" --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple --no-emit-index-url \
    --custom-compile-command "deploy/lock.sh" --quiet --output-file "deploy/requirements${flavour}.lock.txt"
done
