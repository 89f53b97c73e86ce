# Shortcuts; the commands are the documentation (README.md).
.PHONY: build test e2e conformance

build:
	CGO_ENABLED=0 go build -trimpath -o bin/csi-rawcow ./cmd/csi-rawcow

# everything CI runs (as root)
test:
	bash hack/test.sh

# the flows on real Kubernetes components and the CI subset of the External Storage suite (as root)
e2e:
	go test -tags e2e -count=1 -timeout 90m -v ./test/e2e

# Kubernetes' whole External Storage suite but [Disruptive]; reports in _output/conformance
conformance:
	CSI_RAWCOW_CONFORMANCE=full CSI_RAWCOW_CONFORMANCE_REPORT=$(CURDIR)/_output/conformance \
		go test -tags e2e -count=1 -timeout 6h -v -run TestExternalStorage ./test/e2e
