#!/usr/bin/env bash
# The project's test command: vet, the whole test suite as root on real file systems,
# and the concurrency tests again under the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/deps.sh
export CI="${CI:-}"
go vet ./...
go test -count=1 -timeout 60m ./...
go test -count=1 -race -timeout 20m -run 'Concurrent' ./pkg/cow
