// Package e2e runs csi-rawcow on real Kubernetes components: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, containerd and kubelet, with the driver, the
// registrar and the sidecars deployed from deploy/kubernetes. The end-to-end tests carry the
// build tag e2e (go test -tags e2e ./test/e2e); the offline checks of the manifests run
// without it.
package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"os/exec"
	"strings"
)

// cachePaths asks build-k8s.sh where the cached Kubernetes binaries, sidecars and CRDs are
// (K8S_BIN, SIDECARS_BIN, CRD_DIR), without building anything; the script holds the versions.
func cachePaths() (map[string]string, error) {
	out, err := exec.Command("bash", "build-k8s.sh", "env").Output()
	if err != nil {
		return nil, fmt.Errorf("build-k8s.sh env: %w", err)
	}
	paths := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			paths[k] = v
		}
	}
	for _, k := range []string{"K8S_BIN", "SIDECARS_BIN", "CRD_DIR", "CONFORMANCE_BIN"} {
		if paths[k] == "" {
			return nil, fmt.Errorf("build-k8s.sh env: no %s in %q", k, out)
		}
	}
	return paths, nil
}
