#!/usr/bin/env bash
# The project's test command (as root): vet, the whole test suite on real file systems and
# loop devices, the concurrency tests again under the race detector, then the e2e on real
# Kubernetes components: the flows of test/e2e and a subset of Kubernetes' External Storage
# suite. The Kubernetes binaries are built from the Go module proxy into a cache keyed by
# version (test/e2e/build-k8s.sh; cold: about half an hour on 2 cores, then instant), in the
# background while the unit tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/deps.sh
export CI="${CI:-}"

k8s_log=$(mktemp -t csi-rawcow-build-k8s.XXXXXX.log)
(cd test/e2e && exec nice -n 10 bash build-k8s.sh all conformance) >"$k8s_log" 2>&1 &
k8s_build=$!
trap 'kill "$k8s_build" 2>/dev/null || true' EXIT

go vet ./...
go vet -tags e2e ./test/e2e
# test/e2e runs below, once its Kubernetes binaries are there (its offline manifest checks use
# their kubectl)
go test -count=1 -timeout 60m $(go list ./... | grep -v /test/e2e)
go test -count=1 -race -timeout 20m -run 'Concurrent' ./pkg/cow

if ! wait "$k8s_build"; then
	tail -50 "$k8s_log"
	echo "test/e2e/build-k8s.sh failed (log: $k8s_log)" >&2
	exit 1
fi
grep -h 'build-k8s:' "$k8s_log" || true
CSI_RAWCOW_E2E_NO_BUILD=1 go test -tags e2e -count=1 -timeout 80m ./test/e2e
