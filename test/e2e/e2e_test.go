//go:build e2e

package e2e

// go test -tags e2e -timeout 90m ./test/e2e   (as root)
//
// Builds or reuses the cached Kubernetes binaries (build-k8s.sh), brings up a control plane
// on loopback and runs the flows against it; everything it started is stopped at the end,
// also when a test fails. CSI_RAWCOW_E2E_KEEP=1 keeps the work directory (logs, PKI);
// CSI_RAWCOW_E2E_NO_BUILD=1 uses the cache as it is (while build-k8s.sh runs elsewhere).

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const nodeName = "localhost" // resolves, so kubectl logs/exec reach the kubelet

type env struct {
	work    string
	repo    string
	paths   map[string]string
	procs   *procs
	cp      *controlPlane
	node    *node
	bbLayer string            // busybox, the base of the sidecar images
	loops   map[string]string // loop devices before the driver ran: device -> backing file
	deploy  *deployment
}

var (
	setupOnce sync.Once
	theEnv    *env
	setupErr  error
	skipWhy   string
)

func TestMain(m *testing.M) {
	if code, ok := inNamespaces(); ok {
		os.Exit(code)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "e2e: %v, tearing down\n", s)
		teardown()
		os.Exit(1)
	}()
	code := m.Run()
	teardown()
	os.Exit(code)
}

// cluster returns the running environment, bringing it up on first use.
func cluster(t *testing.T) *env {
	t.Helper()
	setupOnce.Do(func() { theEnv, setupErr = setup() })
	if skipWhy != "" {
		t.Skip(skipWhy)
	}
	if setupErr != nil {
		t.Fatalf("e2e setup: %v", setupErr)
	}
	return theEnv
}

func setup() (*env, error) {
	if os.Geteuid() != 0 {
		skipWhy = "the e2e needs root (kubelet, containerd, loop devices, mounts)"
		return nil, nil
	}
	start := time.Now()
	if os.Getenv("CSI_RAWCOW_E2E_NO_BUILD") == "" {
		build := exec.Command("bash", "build-k8s.sh", "all", "conformance")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return nil, fmt.Errorf("build-k8s.sh: %w", err)
		}
	}
	paths, err := cachePaths()
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "e2e: Kubernetes binaries ready in %v (%s, %s)\n", time.Since(start).Round(time.Second), paths["K8S_BIN"], paths["SIDECARS_BIN"])
	work, err := os.MkdirTemp("", "csi-rawcow-e2e-")
	if err != nil {
		return nil, err
	}
	e := &env{work: work, paths: paths, procs: &procs{logDir: filepath.Join(work, "logs")}}
	theEnv = e // teardown stops what started even if setup fails half-way
	t0 := time.Now()
	e.cp, err = startControlPlane(context.Background(), work, paths["K8S_BIN"], nodeName, e.procs)
	if err != nil {
		return nil, fmt.Errorf("control plane: %w (logs in %s)", err, e.procs.logDir)
	}
	fmt.Fprintf(os.Stderr, "e2e: control plane up in %v at %s (work %s)\n", time.Since(t0).Round(time.Millisecond), e.cp.server, work)
	if e.repo, err = filepath.Abs("../.."); err != nil {
		return nil, err
	}
	t0 = time.Now()
	if e.node, err = startContainerd(work, e.procs); err != nil {
		return nil, fmt.Errorf("containerd: %w (logs in %s)", err, e.procs.logDir)
	}
	if e.bbLayer, err = buildBaseImages(e.node); err != nil {
		return nil, err
	}
	if err := e.node.startKubelet(context.Background(), e.cp); err != nil {
		return nil, fmt.Errorf("kubelet: %w (logs in %s)", err, e.procs.logDir)
	}
	fmt.Fprintf(os.Stderr, "e2e: node %s Ready in %v\n", nodeName, time.Since(t0).Round(time.Millisecond))
	return e, nil
}

func teardown() {
	e := theEnv
	if e == nil {
		return
	}
	if e.deploy != nil {
		if err := e.deploy.remove(context.Background(), e.procs.logDir); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
		}
	}
	if e.node != nil {
		for _, err := range e.node.stop() {
			fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
		}
	}
	detachNewLoops(e.loops, e.work)
	e.procs.stopAll(10 * time.Second)
	if err := unmountUnder(e.work); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: teardown: %v\n", err)
	}
	left := mountsUnder(kubeletRoot) + mountsUnder(e.work)
	fmt.Fprintf(os.Stderr, "e2e: teardown done; mounts left under %s and %s: %d\n", kubeletRoot, e.work, left)
	if left == 0 {
		// kubelet's state, with no mount left inside it
		os.RemoveAll(kubeletRoot)
	}
	if os.Getenv("CSI_RAWCOW_E2E_KEEP") != "" || setupErr != nil {
		fmt.Fprintf(os.Stderr, "e2e: work directory kept: %s\n", e.work)
		return
	}
	os.RemoveAll(e.work)
}

func TestControlPlane(t *testing.T) {
	e := cluster(t)
	ctx := context.Background()
	out, err := e.cp.kubectl(ctx, nil, "version", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `"gitVersion": "v1.34.4"`) {
		t.Errorf("kubectl version:\n%s", out)
	}
	out, err = e.cp.kubectl(ctx, nil, "get", "node", nodeName, "-o", "jsonpath={.status.nodeInfo.kubeletVersion}")
	if err != nil || string(out) != "v1.34.4" {
		t.Errorf("node %s kubelet version %q: %v", nodeName, out, err)
	}
	// the scheduler and the controller-manager answer through leases-free health: the
	// default service account exists (controller-manager), the scheduler runs
	for _, p := range e.procs.list {
		if !p.running() {
			t.Errorf("%s exited: %v\n%s", p.name, p.err, p.tail(20))
		}
	}
}

// The manifests of deploy/kubernetes pass the API server's own validation (strict field
// validation), deploy, and the node plugin registers with kubelet through `csi-rawcow
// registrar`: kubelet writes the CSINode entry with the topology key and labels the node.
func TestDriverRegistered(t *testing.T) {
	e := cluster(t)
	d := driverDeployed(t)
	ctx := context.Background()
	out, err := e.cp.kubectl(ctx, nil, "get", "csinode", nodeName, "-o", "jsonpath={.spec.drivers[?(@.name==\"rawcow.csi.io\")].topologyKeys}")
	if err != nil || !strings.Contains(string(out), "topology.rawcow.csi/node") {
		t.Errorf("CSINode %s: topology keys %q: %v", nodeName, out, err)
	}
	out, err = e.cp.kubectl(ctx, nil, "get", "node", nodeName, "-o", "jsonpath={.metadata.labels.topology\\.rawcow\\.csi/node}")
	if err != nil || string(out) != nodeName {
		t.Errorf("node label topology.rawcow.csi/node = %q: %v", out, err)
	}
	out, err = e.cp.kubectl(ctx, nil, "get", "csistoragecapacities", "-n", "csi-rawcow", "-o", "jsonpath={.items[*].storageClassName}")
	if err != nil {
		t.Error(err)
	}
	t.Logf("CSIStorageCapacity objects for classes: %s (pod %s)", out, d.pod)
}
