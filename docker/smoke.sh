#!/usr/bin/env sh
# Build the CPU image, bring it up with Docker Compose and check it end to end: docker/smoke.py --help.
#   docker/smoke.sh                       # a host that reaches Docker Hub and PyTorch's CPU index
#   docker/smoke.sh --local-base --torch-index-url https://pypi.org/simple --ca "$PIP_CERT"
exec python3 "$(dirname "$0")/smoke.py" "$@"
